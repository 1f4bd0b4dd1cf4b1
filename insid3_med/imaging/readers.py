"""Read volumes, 2D images and label maps from disk into :class:`Volume` (array (K, J, I), geometry in LPS).

Formats: NIfTI (.nii, .nii.gz; also FreeSurfer .mgz/.mgh) through nibabel; NRRD (.nrrd, .nhdr) and MetaImage
(.mha, .mhd) through SimpleITK; DICOM folders and files through pydicom (see :mod:`insid3_med.imaging.dicom`);
PNG, JPEG, BMP and TIFF through Pillow. Every failure is an :class:`ImageReadError` (a ``ValueError``) naming
the file and the problem; a missing path is an :class:`ImageNotFoundError` (also a ``FileNotFoundError``).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from insid3_med.imaging.dicom import (
    SeriesInfo,
    has_dicom_preamble,
    list_dicom_series,
    no_series_message,
    read_dicom_files,
    read_dicom_image,
    read_dicom_series,
    read_series_of_file,
)
from insid3_med.imaging.errors import ImageNotFoundError, ImageReadError, SeveralFramesError
from insid3_med.imaging.geometry import (
    Geometry,
    OutsideGridError,
    Volume,
    direction_rows,
    float_triple,
    place_on_grid,
)

if TYPE_CHECKING:
    from nibabel.nifti1 import Nifti1Header
    from nibabel.spatialimages import SpatialImage

__all__ = [
    "ImageNotFoundError",
    "ImageReadError",
    "SeriesInfo",
    "describe",
    "list_dicom_series",
    "read_image_2d",
    "read_label_names",
    "read_label_volume",
    "read_volume",
]

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
SIMPLEITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def is_dicom_file(path: Path) -> bool:
    """Whether a file is DICOM, from its suffix or its ``DICM`` marker (nothing else is read)."""
    return _suffix(path) in DICOM_SUFFIXES or has_dicom_preamble(path)


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float64 else array


def _frame_of(path: Path, shape: tuple[int, ...], frame: int | None) -> int | None:
    """Which frame of a 4D image of ``shape`` (x, y, z, t...) to read: ``frame`` checked against t, or None for a 3D
    image; a 4D image without a frame, another number of dimensions, or a frame given for a 3D image are errors."""
    extra = [s for s in shape[3:] if s != 1]
    if not extra:
        if frame is not None:
            raise ImageReadError(path, f"a 3D image of shape {shape[:3]}: a frame is chosen in a 4D image only")
        return None
    if len(shape) != 4:
        raise ImageReadError(path, f"{len(shape)}D image of shape {shape}; only 3D volumes and 4D frames can be read")
    frames = shape[3]
    if frame is None:
        raise SeveralFramesError(path, f"4D image of shape {shape}: {frames} frames (the phases of a cine, the "
                                 "contrasts of a multi-modal study...); choose one", frames)
    if not 0 <= frame < frames:
        raise ImageReadError(path, f"frame {frame} asked of a 4D image with {frames} frames (0 to {frames - 1})")
    return frame


def _refuse_a_frame_of_another_format(path: Path, frame: int | None) -> None:
    """A frame is read from a 4D NIfTI, NRRD or MetaImage file only (not a folder, a DICOM or a 2D file)."""
    if frame is not None and (path.is_dir() or _suffix(path) not in (*NIBABEL_SUFFIXES, *SIMPLEITK_SUFFIXES)):
        raise ImageReadError(path, "a frame is chosen in a 4D NIfTI, NRRD or MetaImage file only")


def check_frame(path: str | Path, frame: int | None) -> None:
    """Raise as :func:`read_volume` would for ``frame`` of ``path`` (a 4D file without one, a frame out of range or
    of a 3D file), reading the header only; files that cannot be read are left to :func:`read_volume`."""
    path = Path(path)
    _refuse_a_frame_of_another_format(path, frame)
    shape = _header_shape(path)
    if shape is not None:
        _frame_of(path, shape, frame)


def count_frames(path: str | Path) -> int:
    """The number of frames of a 4D NIfTI, NRRD or MetaImage file, from its header; raises
    :class:`ImageReadError` for anything else (a 3D image, a folder, another format, an unreadable header)."""
    path = Path(path)
    _refuse_a_frame_of_another_format(path, 0)
    shape = _header_shape(path)
    if shape is None:
        raise ImageReadError(path, "cannot be read as a 4D image (its header is unreadable)")
    try:
        _frame_of(path, shape, None)
    except SeveralFramesError as error:
        return error.frames
    raise ImageReadError(path, f"a 3D image of shape {shape[:3]}, not a 4D one with frames")


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """The (x, y, z, t...) shape a NIfTI, NRRD or MetaImage header gives; None for other files or an unreadable
    header."""
    suffix = _suffix(path)
    try:
        if suffix in NIBABEL_SUFFIXES:
            import nibabel as nib

            return tuple(int(n) for n in cast("SpatialImage", nib.load(path)).shape)
        if suffix in SIMPLEITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return tuple(int(n) for n in reader.GetSize())
    except Exception:  # noqa: BLE001 - unreadable headers are reported when the file is read
        return None
    return None


def _read_nibabel(path: Path, frame: int | None = None) -> Volume:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        # Every image class nibabel reads for these suffixes (NIfTI-1/2, MGH) is a SpatialImage: the stub says only
        # FileBasedImage.
        image = cast("SpatialImage", nib.load(path))
        shape = tuple(int(s) for s in image.shape)
        chosen = _frame_of(path, shape, frame)
        data = np.asanyarray(image.dataobj if chosen is None else image.dataobj[:, :, :, chosen])
    except ImageReadError:
        raise
    except (ImageFileError, EOFError, zlib.error, OSError, ValueError, TypeError) as error:
        raise ImageReadError(
            path, f"cannot be read as {_suffix(path)} ({type(error).__name__}: {error})"
        ) from error
    if data.dtype.names:
        raise ImageReadError(path, f"structured voxel type {data.dtype} (RGB NIfTI) is not supported")
    data = data.reshape(shape[:3] + (1,) * (3 - min(len(shape), 3)))
    metadata: dict[str, Any] = {"format": "mgh" if _suffix(path) in (".mgz", ".mgh") else "nifti"}
    if chosen is not None:
        metadata["frame"] = chosen
    if metadata["format"] == "nifti":
        header = cast("Nifti1Header", image.header)  # Nifti1Header or its subclass Nifti2Header
        metadata["nifti_qform_code"] = int(header["qform_code"])
        metadata["nifti_sform_code"] = int(header["sform_code"])
        if chosen is not None:  # the time between frames, in the file's own unit
            metadata["frame_step"] = [float(header.get_zooms()[3]), str(header.get_xyzt_units()[1])]
        intent = header.get_intent()[0]
        if intent and intent != "none":
            metadata["nifti_intent"] = str(intent)
    return Volume(
        array=np.ascontiguousarray(_as_float32(data).transpose(2, 1, 0)),
        geometry=Geometry.from_ijk_to_ras(image.affine),
        modality=None,
        source=path,
        metadata=metadata,
    )


def _read_simpleitk(path: Path, frame: int | None = None) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        chosen = _frame_of(path, size, frame)
        if chosen is not None:  # only that frame is read: the 4th axis collapsed
            reader.SetExtractIndex([0, 0, 0, chosen])
            reader.SetExtractSize([*size[:3], 0])
        image = reader.Execute()
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ImageReadError(path, f"cannot be read ({message})") from error
    if image.GetDimension() > 3:
        image = sitk.Extract(image, list(size[:3]) + [0] * (len(size) - 3), [0] * len(size))
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3):
        raise ImageReadError(path, f"{components} components per voxel; grey or RGB images only")
    dimension = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    spacing, origin = list(image.GetSpacing()), list(image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    if dimension == 2:
        array = array[np.newaxis]
        spacing, origin = spacing + [1.0], origin + [0.0]
        direction = np.block([[direction, np.zeros((2, 1))], [np.zeros((1, 2)), np.ones((1, 1))]])
    metadata: dict[str, Any] = {
        "format": "nrrd" if _suffix(path) in (".nrrd", ".nhdr", ".seg.nrrd") else "metaimage"
    }
    if chosen is not None:
        metadata["frame"] = chosen
    header = {
        key: image.GetMetaData(key)
        for key in image.GetMetaDataKeys()
        if len(image.GetMetaData(key)) < 200
    }
    if header:
        metadata["header"] = header
    modality = header.get("Modality") or header.get("modality")
    return Volume(
        array=np.ascontiguousarray(_as_float32(array)),
        geometry=Geometry(
            spacing=float_triple(spacing),
            origin=float_triple(origin),
            direction=direction_rows(direction),
        ),
        modality=str(modality).upper() if modality else None,
        source=path,
        metadata=metadata,
    )


def _pil_array(path: Path, as_labels: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """(H, W) or (H, W, 3) pixel array of a PNG/JPEG/BMP/TIFF file, with facts for the metadata."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            frames = int(getattr(image, "n_frames", 1))
            if frames > 1:
                raise ImageReadError(path, f"{frames} frames/pages; one 2D image was expected")
            image.load()
            if not as_labels:
                image = ImageOps.exif_transpose(image)
            mode = image.mode
            if mode == "P" and as_labels:
                array = np.asarray(image)  # palette indices are the label values
            elif mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
                array = np.asarray(image)
                if mode == "1":
                    array = array.astype(np.uint8)
                elif mode.startswith("I;16"):
                    array = array.astype(np.uint16)
            elif mode == "LA":
                array = np.asarray(image.convert("L"))
            else:
                array = np.asarray(image.convert("RGB"))
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(
            path, f"cannot be read as an image ({type(error).__name__}: {error})"
        ) from error
    metadata: dict[str, Any] = {
        "format": _suffix(path).lstrip(".").replace("jpg", "jpeg"),
        "pil_mode": mode,
    }
    if (
        array.ndim == 3
        and np.array_equal(array[..., 0], array[..., 1])
        and np.array_equal(array[..., 0], array[..., 2])
    ):
        array = array[..., 0]
        metadata["grey_from_rgb"] = True
    return np.ascontiguousarray(array), metadata


def read_image_2d(path: str | Path) -> Volume:
    """A 2D image as a volume with K = 1: (1, H, W) grey or (1, H, W, 3) RGB.

    PNG, JPEG, BMP and TIFF through Pillow (RGB files whose three channels are equal become grey; EXIF
    rotation is applied; spacing 1 mm; modality "XC" for colour, "OT" for grey), single-frame DICOM through
    pydicom (modality units, VOI LUT/window and photometric interpretation in metadata, MONOCHROME1 flagged,
    not inverted). Any other format is read as a volume and must have exactly one slice.
    """
    path = Path(path)
    if not path.exists():
        raise ImageNotFoundError(path, "no such file")
    if path.is_dir():
        raise ImageReadError(path, "a folder, not a 2D image file")
    suffix = _suffix(path)
    if suffix in IMAGE_2D_SUFFIXES:
        array, metadata = _pil_array(path, as_labels=False)
        return Volume(
            array=array[np.newaxis],
            geometry=Geometry(),
            modality="XC" if array.ndim == 3 else "OT",
            source=path,
            metadata=metadata,
        )
    if is_dicom_file(path):
        return read_dicom_image(path)
    volume = read_volume(path)
    if volume.shape[0] != 1:
        raise ImageReadError(path, f"{volume.shape[0]} slices; a 2D image (one slice) was expected")
    return volume


def read_volume(
    path: str | Path, series_uid: str | None = None, series_number: int | None = None, *,
    whole_series: bool = False, frame: int | None = None,
) -> Volume:
    """A 3D volume (K, J, I) with its geometry, from a file or a DICOM series folder.

    ``series_uid`` / ``series_number`` pick one series of a DICOM folder that holds several (otherwise a
    :class:`SeveralSeriesError` lists them). ``whole_series``: a single-frame DICOM image file stands for the
    series it belongs to (:func:`~insid3_med.imaging.dicom.read_series_of_file`), as viewers open a series from
    one of its files; otherwise it is read alone (K = 1). 2D image files come back with K = 1 (see
    :func:`read_image_2d`). ``frame``: the frame (4th axis index) of a 4D NIfTI, NRRD or MetaImage file (a phase
    of a cine, a contrast of a multi-modal study); a 4D file without it raises :class:`SeveralFramesError`.
    Missing, corrupt or unsupported files raise :class:`ImageReadError`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageNotFoundError(path, "no such file or folder")
    _refuse_a_frame_of_another_format(path, frame)
    suffix = _suffix(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid, series_number=series_number)
    if series_uid is not None or series_number is not None:
        raise ImageReadError(path, "a series is chosen in a DICOM folder; a file is read as it is")
    if suffix in NIBABEL_SUFFIXES:
        return _read_nibabel(path, frame)
    if suffix in SIMPLEITK_SUFFIXES or suffix == ".seg.nrrd":
        return _read_simpleitk(path, frame)
    if suffix in IMAGE_2D_SUFFIXES:
        return read_image_2d(path)
    if is_dicom_file(path):
        return read_series_of_file(path) if whole_series else read_dicom_files([path], source=path)
    try:
        return _read_simpleitk(path)
    except ImageReadError as error:
        raise ImageReadError(
            path,
            "unsupported format (expected NIfTI, NRRD, MHA/MHD, DICOM, PNG, JPEG, BMP or TIFF): "
            + error.problem,
        ) from error


OVERLAP_ADVICE = ("a label map holds one structure per voxel: propagate overlapping segments in separate runs, or "
                  "draw nested structures as their parts (a tumour's core and its oedema, not the core and the whole "
                  "tumour)")


def _read_seg_nrrd(path: Path) -> tuple[np.ndarray, Geometry]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # slicerio/pynrrd raise assorted types on bad headers
        raise ImageReadError(path, f"cannot be read as a Slicer segmentation ({error})") from error
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim != 3:
        layers: dict[int, list[str]] = {}
        for segment in segmentation.get("segments", []):
            layers.setdefault(int(segment.get("layer", 0)), []).append(str(segment.get("name", segment.get("id"))))
        listing = "; ".join(f"layer {n + 1}: {', '.join(names)}" for n, names in sorted(layers.items()))
        raise ImageReadError(path, f"segments overlap ({voxels.shape[0]} layers: {listing}); {OVERLAP_ADVICE}")
    return voxels.transpose(2, 1, 0), Geometry.from_ijk_to_lps(np.asarray(segmentation["ijkToLPS"]))


def read_label_names(path: str | Path) -> dict[int, str]:
    """The structure names a label-map file carries: {label value: name}.

    A Slicer ``.seg.nrrd``'s segment names (by label value) and a DICOM SEG's segment labels (by segment number);
    empty for formats without names (NIfTI, NRRD, MHA, PNG) or a file that cannot be read (:func:`read_label_volume`
    reports that).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        if _suffix(path) == ".seg.nrrd":
            import slicerio

            segments = slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]
            return {int(s["labelValue"]): str(s["name"]) for s in segments if "labelValue" in s and s.get("name")}
        if is_dicom_file(path) and _dicom_modality(path) == "SEG":
            import highdicom as hd

            segmentation = hd.seg.segread(path)
            return {int(n): str(segmentation.get_segment_description(n).segment_label)
                    for n in segmentation.get_segment_numbers()}
    except Exception:  # noqa: BLE001 - names are a courtesy; reading the labels reports a bad file
        return {}
    return {}


def _declares_other_placement(geometry: Geometry, image: Geometry, atol: float) -> bool:
    """True when ``geometry`` puts its first voxel elsewhere than ``image`` does, or orders its axes otherwise."""
    ours, theirs = geometry.ijk_to_lps(), image.ijk_to_lps()
    same_origin = np.allclose(ours[:3, 3], theirs[:3, 3], atol=atol)
    return not (same_origin and np.allclose(geometry.direction_matrix(), image.direction_matrix(), atol=atol))


def _dicom_modality(path: Path) -> str | None:
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
    except Exception:  # noqa: BLE001 - not readable as DICOM here: the volume reader reports what is wrong
        return None


def _read_dicom_seg(path: Path, like: Volume) -> tuple[np.ndarray, Geometry]:
    """A DICOM SEG as (K, J, I) labels (segment n -> n) with its geometry.

    On the frames of ``like`` when ``like`` is the classic DICOM series the SEG references (the standard link, by
    SOPInstanceUID); otherwise on the SEG's own volume (its frames' plane positions), for :func:`place_on_grid`.
    """
    import highdicom as hd

    try:
        segmentation = hd.seg.segread(path)
    except Exception as error:  # noqa: BLE001 - pydicom/highdicom raise assorted types on bad files
        raise ImageReadError(path, f"cannot be read as a DICOM SEG ({error})") from error
    if segmentation.segmentation_type != hd.seg.SegmentationTypeValues.BINARY:
        raise ImageReadError(path, "fractional DICOM SEG; a label map needs a binary segmentation")
    uids = [str(uid) for uid in like.metadata.get("sop_instance_uids") or []]  # a classic series, in slice order
    try:
        if len(uids) == like.shape[0]:
            referenced = {uid for _, _, uid in segmentation.get_source_image_uids()}
            if referenced & set(uids):
                pixels = segmentation.get_pixels_by_source_instance(
                    source_sop_instance_uids=uids, combine_segments=True, relabel=False,
                    ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
                return np.asarray(pixels), like.geometry
        volume = segmentation.get_volume(combine_segments=True, relabel=False)
    except Exception as error:  # noqa: BLE001 - highdicom reports overlap, missing positions etc. as assorted types
        if "overlap" in str(error):
            raise ImageReadError(path, f"segments overlap; {OVERLAP_ADVICE}") from error
        raise ImageReadError(path, f"DICOM SEG cannot be turned into a label map ({error})") from error
    # highdicom's affine maps (frame, row, column) indices to LPS; ours maps (i, j, k) = (column, row, frame).
    affine = np.asarray(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]
    return np.asarray(volume.array), Geometry.from_ijk_to_lps(affine)


SAME_GRID_FRACTION = 0.01
"""A label map whose voxels all lie within this fraction of the smallest voxel spacing of the image's is on its grid."""


def _geometry_differences(geometry: Geometry, image: Geometry) -> str:
    """What differs between a label map's grid and the image's, in words (spacing, origin, direction)."""
    parts = []
    for name, mine, theirs in (("spacing", geometry.spacing, image.spacing), ("origin", geometry.origin, image.origin)):
        if not np.allclose(mine, theirs, atol=1e-6):
            parts.append(f"{name} {[round(v, 4) for v in mine]} mm against {[round(v, 4) for v in theirs]}")
    if not np.allclose(geometry.direction_matrix(), image.direction_matrix(), atol=1e-6):
        angle = np.degrees(np.arccos(np.clip((np.trace(geometry.direction_matrix().T @ image.direction_matrix()) - 1)
                                             / 2, -1.0, 1.0)))
        parts.append(f"direction turned by {angle:.2g} degrees")
    return "; ".join(parts) or "no difference above 1e-6"


def _describe_geometry(geometry: Geometry) -> dict[str, Any]:
    return {
        "spacing": [float(v) for v in geometry.spacing],
        "origin": [float(v) for v in geometry.origin],
        "direction": [[float(v) for v in row] for row in geometry.direction],
    }


def read_label_volume(path: str | Path, like: Volume, atol: float = 1e-3) -> np.ndarray:
    """A label map on the grid of ``like``: integer array (K, J, I), uint8/uint16 when the labels fit.

    Reads any volume format, Slicer ``.seg.nrrd`` (one layer), DICOM SEG (binary, segment n -> label n) and
    PNG/TIFF masks (palette indices are labels). A map on the same voxel lattice as ``like`` but another extent or
    axis order (a segmentation saved cropped, a DICOM SEG holding only its labelled frames) is placed onto
    ``like``'s grid voxel for voxel (:func:`~insid3_med.imaging.geometry.place_on_grid`). Raises
    :class:`ImageReadError` when the map is RGB, holds non-integer or negative values, has labels outside the
    image, or lies on another lattice. Same shape and every voxel within 1% of the smallest voxel spacing (at
    least ``atol`` mm) of the image's is the same grid; a lattice placement (:func:`place_on_grid`) is to ``atol``.
    """
    path = Path(path)
    if not path.exists():
        raise ImageNotFoundError(path, "no such file or folder")
    suffix = _suffix(path)
    placed_by_positions = False
    if suffix == ".seg.nrrd":
        array, geometry = _read_seg_nrrd(path)
    elif path.is_file() and is_dicom_file(path) and _dicom_modality(path) == "SEG":
        array, geometry = _read_dicom_seg(path, like)
        placed_by_positions = True  # a DICOM SEG's frames carry their true positions
    elif suffix in IMAGE_2D_SUFFIXES:
        array, _ = _pil_array(path, as_labels=True)
        if array.ndim == 3:
            raise ImageReadError(path, "colour (RGB) image; a label map needs one integer channel")
        # A plain 2D mask has no geometry of its own: it lies on its image's pixels (shape checked only).
        array, geometry = array[np.newaxis], like.geometry
    else:
        volume = read_volume(path)
        if volume.is_rgb:
            raise ImageReadError(path, "colour (RGB) volume; a label map needs one integer channel")
        array, geometry = volume.array, volume.geometry
    # Same grid: every voxel within 1% of a voxel of the image's (headers written in float32, or rounded, differ
    # by that much; the labels then lie on the same voxels).
    tolerance = max(atol, SAME_GRID_FRACTION * min(like.geometry.spacing))
    offset = like.geometry.max_distance(geometry, like.shape) if array.shape[:3] == like.shape else np.inf
    same_grid = offset <= tolerance
    if not same_grid and array.ndim == 3 and (
        placed_by_positions or _declares_other_placement(geometry, like.geometry, atol)
    ):
        # Same voxel lattice, other extent or axis order (a cropped Slicer segmentation, a DICOM SEG's frames).
        # A map with the image's own origin and axes but another shape is more likely another study's (many data
        # sets carry an identity header): that stays an error.
        try:
            placed = place_on_grid(array, geometry, like.geometry, like.shape, atol=atol)
        except OutsideGridError as error:
            raise ImageReadError(path, f"label map on the image's voxel grid, but {error}") from error
        if placed is not None:
            array, geometry, same_grid = placed, like.geometry, True
    if not same_grid and array.shape[:3] != like.shape:
        raise ImageReadError(
            path,
            f"label map shape (K, J, I) = {tuple(array.shape)} differs from the image's {like.shape}, and its "
            "voxels do not lie on the image's voxel grid",
        )
    if not same_grid:
        raise ImageReadError(
            path,
            f"label map has the image's shape but lies on another grid: voxels up to {offset:.3g} mm "
            f"({offset / min(like.geometry.spacing):.2g} voxel) from the image's, where up to {tolerance:.3g} mm is "
            f"the same grid ({_geometry_differences(geometry, like.geometry)}); resample it onto the image grid first",
        )
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ImageReadError(
                path, "non-integer values: a label map holds integer labels (not probabilities)"
            )
    elif array.dtype.kind not in "iub":
        raise ImageReadError(path, f"voxel type {array.dtype} cannot hold labels")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0:
        raise ImageReadError(path, f"negative label {low}")
    dtype = np.uint8 if high <= 255 else np.uint16 if high <= 65535 else np.int32
    labels = np.ascontiguousarray(array.astype(dtype))
    _refuse_an_image_given_as_labels(path, labels)
    return labels


MAX_LABEL_VALUES = 255
"""More distinct structure values than this in a label map: an image given as the labels, refused."""
MAX_LABEL_VALUES_COVERING_ALL = 64
"""More distinct structure values than this over more than 90% of the voxels: an image too (an 8-bit one; a
whole-body label map of a hundred structures leaves the air outside the body)."""


def _refuse_an_image_given_as_labels(path: Path, labels: np.ndarray) -> None:
    """An image given where its label map was expected (the arguments swapped) would be propagated as thousands of
    structures for hours: refuse a map with more than 255 distinct values, or more than 64 over 90% of the voxels."""
    if not labels.size:
        return
    if labels.dtype.itemsize <= 2:
        counts = np.bincount(labels.ravel())
        distinct, background = int(np.count_nonzero(counts[1:])), int(counts[0])
    else:
        values, counts = np.unique(labels, return_counts=True)
        distinct, background = int(np.count_nonzero(values)), int(counts[0]) if values[0] == 0 else 0
    covered = 1.0 - background / labels.size
    if distinct > MAX_LABEL_VALUES or (distinct > MAX_LABEL_VALUES_COVERING_ALL and covered > 0.9):
        raise ImageReadError(path, f"{distinct} distinct values over {covered:.0%} of the voxels: an image rather than "
                             "a label map (0 = background, one value per structure)? Check the order of the image "
                             "and the label map")


def _describe_volume(volume: Volume) -> dict[str, Any]:
    from insid3_med.imaging.intensity import choose_preset

    array = volume.array
    finite = array[np.isfinite(array)] if array.dtype.kind == "f" else array
    info: dict[str, Any] = {
        "format": volume.metadata.get("format"),
        "shape": [int(s) for s in array.shape],
        "dtype": str(array.dtype),
        "rgb": volume.is_rgb,
        "modality": volume.modality,
        **_describe_geometry(volume.geometry),
        "intensity_min": float(finite.min()) if finite.size else None,
        "intensity_max": float(finite.max()) if finite.size else None,
        "preset": choose_preset(volume),
    }
    for key in (
        "photometric_interpretation",
        "window_center",
        "window_width",
        "voi_lut_function",
        "series_instance_uid",
        "study_instance_uid",
        "series_number",
        "series_description",
        "nifti_qform_code",
        "nifti_sform_code",
    ):
        if volume.metadata.get(key) is not None:
            info[key] = volume.metadata[key]
    if "voi_lut" in volume.metadata:
        info["voi_lut_entries"] = int(len(volume.metadata["voi_lut"]["data"]))
    if "source_files" in volume.metadata:
        info["n_files"] = len(volume.metadata["source_files"])
    info["slice_planes"] = {name: volume.geometry.slice_plane(axis) for axis, name in enumerate("kji")}
    return info


def describe(path: str | Path) -> dict[str, Any]:
    """What a file or folder holds, as a JSON-ready dict (for the ``info`` command).

    For a DICOM folder: ``series`` (one entry per series); when it holds exactly one series, also that
    volume's description. For a file: format, shape, dtype, modality, geometry (spacing, origin, direction in
    LPS), intensity range and the intensity preset :func:`choose_preset` would pick; for one file of a DICOM
    series, those of the whole series, as ``propagate`` and ``transfer`` read it; for a 4D file, its number of
    frames and frame 0's description. For a DICOM SEG: its segments (number and label), frames and the series it
    references.
    """
    path = Path(path)
    if not path.exists():
        raise ImageNotFoundError(path, "no such file or folder")
    info: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        series = list_dicom_series(path)
        info["kind"] = "dicom_folder"
        info["series"] = [s.to_dict() for s in series]
        if len(series) == 1:
            info.update(_describe_volume(read_dicom_files(series[0].files, source=path)))
        elif not series:
            raise ImageReadError(path, no_series_message(path))
        return info
    if is_dicom_file(path) and _dicom_modality(path) == "SEG":
        info["kind"] = "dicom_seg"
        info.update(_describe_dicom_seg(path))
        return info
    info["kind"] = "file"
    try:
        volume = read_volume(path, whole_series=True)
    except SeveralFramesError as error:  # a 4D file: its frame count, and frame 0 described
        volume = read_volume(path, frame=0)
        info.update({"kind": "4d_file", "frames": error.frames, "described_frame": 0})
    if len(volume.metadata.get("source_files", ())) > 1:  # a DICOM file: the series it stands for
        info["kind"] = "dicom_series_file"
        info["series_files"] = len(volume.metadata["source_files"])
    info.update(_describe_volume(volume))
    return info


def _describe_dicom_seg(path: Path) -> dict[str, Any]:
    """A DICOM SEG's segments, frames and the series it references (for ``info``; usable as a label map)."""
    import highdicom as hd

    try:
        segmentation = hd.seg.segread(path)
    except Exception as error:  # noqa: BLE001 - pydicom/highdicom raise assorted types on bad files
        raise ImageReadError(path, f"cannot be read as a DICOM SEG ({error})") from error
    referenced = sorted({series for _, series, _ in segmentation.get_source_image_uids()})
    return {
        "format": "dicom_seg",
        "modality": "SEG",
        "segmentation_type": str(segmentation.segmentation_type.value),
        "segments": [
            {"number": int(number), "label": str(segmentation.get_segment_description(number).segment_label)}
            for number in segmentation.get_segment_numbers()
        ],
        "frames": int(segmentation.number_of_frames),
        "rows": int(segmentation.Rows),
        "columns": int(segmentation.Columns),
        "series_instance_uid": str(segmentation.SeriesInstanceUID),
        "referenced_series_instance_uids": [str(uid) for uid in referenced],
    }
