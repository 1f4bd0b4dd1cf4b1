"""Write label maps on the grid of their source volume: NIfTI, Slicer ``.seg.nrrd`` and DICOM SEG.

Every writer takes ``labels`` as an integer array (K, J, I) on the grid of ``like`` (the :class:`Volume` it
was computed from), writes to a temporary file in the destination folder and moves it into place
(``os.replace``), so no partial file is ever left; an existing output is kept unless ``overwrite=True``
(:class:`OutputExistsError`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from insid3_med import __version__
from insid3_med.imaging.errors import ImageWriteError, OutputExistsError
from insid3_med.imaging.geometry import Volume

__all__ = [
    "ImageWriteError",
    "OutputExistsError",
    "atomic_output",
    "label_color",
    "write_dicom_seg",
    "write_nifti_labels",
    "write_seg_nrrd",
]

#: Default segment colours (RGB in [0, 1]) for labels 1, 2, 3, ... (cycled): distinct on grey images.
LABEL_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.10, 0.10),
    (0.10, 0.75, 0.20),
    (0.15, 0.45, 0.95),
    (0.98, 0.80, 0.10),
    (0.85, 0.20, 0.85),
    (0.10, 0.85, 0.85),
    (1.00, 0.55, 0.10),
    (0.55, 0.35, 0.90),
    (0.60, 0.90, 0.30),
    (0.95, 0.50, 0.65),
)

SOFTWARE_NAME = "insid3-med"


def label_color(value: int) -> tuple[float, float, float]:
    """Default colour (RGB in [0, 1]) of label ``value`` (>= 1)."""
    return LABEL_COLORS[(int(value) - 1) % len(LABEL_COLORS)]


def _full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return path.name[-len(suffix) :]
    return path.suffix


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write to; move it to ``path`` on success.

    Raises :class:`OutputExistsError` when ``path`` exists and ``overwrite`` is false (checked before writing
    and again, atomically, when moving into place). On any error the temporary file is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageWriteError(path, "is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=_full_suffix(path), dir=path.parent
    )
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if the output appeared meanwhile: never clobber
            except FileExistsError as error:
                raise OutputExistsError(
                    path, "already exists; pass overwrite=True to replace it"
                ) from error
            except OSError:
                if path.exists():
                    raise OutputExistsError(
                        path, "already exists; pass overwrite=True to replace it"
                    ) from None
                os.replace(temporary, path)  # file system without hard links
            temporary.unlink(missing_ok=True)
    finally:
        temporary.unlink(missing_ok=True)


def checked_labels(labels: np.ndarray, like: Volume, path: str | Path) -> np.ndarray:
    """``labels`` as uint8 (uint16 when a label exceeds 255) of shape ``like.shape`` (K, J, I).

    A (J, I) array is accepted for a one-slice ``like``. Raises :class:`ImageWriteError` for a shape mismatch,
    non-integer, negative or too large (> 65535) values.
    """
    array = np.asarray(labels)
    if array.ndim == 2 and like.shape[0] == 1:
        array = array[np.newaxis]
    if array.shape != like.shape:
        raise ImageWriteError(
            path, f"labels of shape {array.shape} do not match the image grid (K, J, I) {like.shape}"
        )
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ImageWriteError(path, "labels must be integers (got non-integer values)")
    elif array.dtype.kind not in "iu":
        raise ImageWriteError(path, f"labels of type {array.dtype} are not integers")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0:
        raise ImageWriteError(path, f"negative label {low}")
    if high > 65535:
        raise ImageWriteError(path, f"label {high} does not fit 16 bits")
    return array.astype(np.uint8 if high <= 255 else np.uint16)


def write_nifti_labels(
    labels: np.ndarray, like: Volume, path: str | Path, overwrite: bool = False
) -> Path:
    """NIfTI label map (.nii or .nii.gz) with ``like``'s exact geometry; returns ``path``.

    Voxels uint8 (uint16 when labels > 255) in NIfTI (i, j, k) order; affine ``like.geometry.ijk_to_ras()`` in
    both qform and sform, with the source NIfTI's qform/sform codes when ``like`` came from NIfTI (else 1,
    scanner); intent "label".
    """
    path = _nifti_name(path)
    array = checked_labels(labels, like, path)
    image = _nifti_label_image(np.ascontiguousarray(array.transpose(2, 1, 0)), like)
    with atomic_output(path, overwrite) as temporary:
        image.to_filename(temporary)
    return path


def write_nifti_label_frames(frames: Sequence[np.ndarray], like: Volume, path: str | Path,
                             overwrite: bool = False) -> Path:
    """4D NIfTI label map (i, j, k, t): one (K, J, I) label map per frame of a 4D study, on ``like``'s grid (any of
    its frames), as :func:`write_nifti_labels` writes one. The time between frames (pixdim[4]) and its unit are
    the source NIfTI's (``like.metadata["frame_step"]``), else 1 with no unit. Returns ``path``."""
    path = _nifti_name(path)
    if not frames:
        raise ImageWriteError(path, "no frame to write")
    checked = [checked_labels(frame, like, path) for frame in frames]
    dtype = np.uint16 if any(array.dtype == np.uint16 for array in checked) else np.uint8
    array = np.stack([a.astype(dtype).transpose(2, 1, 0) for a in checked], axis=-1)
    image = _nifti_label_image(np.ascontiguousarray(array), like)
    step, unit = like.metadata.get("frame_step", (1.0, "unknown"))
    image.header.set_zooms((*image.header.get_zooms()[:3], float(step)))
    image.header.set_xyzt_units("mm", unit)
    with atomic_output(path, overwrite) as temporary:
        image.to_filename(temporary)
    return path


def _nifti_name(path: str | Path) -> Path:
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise ImageWriteError(path, "a NIfTI file name ends with .nii or .nii.gz")
    return path


def _nifti_label_image(voxels: np.ndarray, like: Volume) -> Any:
    """A ``Nifti1Image`` of label ``voxels`` ((I, J, K) or (I, J, K, T), uint8 or uint16) on ``like``'s grid."""
    import nibabel as nib

    affine = like.geometry.ijk_to_ras()
    image = nib.Nifti1Image(voxels, affine)
    qform_code = int(like.metadata.get("nifti_qform_code", 0) or 0)
    sform_code = int(like.metadata.get("nifti_sform_code", 0) or 0)
    if qform_code == 0 and sform_code == 0:
        qform_code = sform_code = 1
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    header = image.header
    header.set_data_dtype(voxels.dtype)
    header.set_intent("label")
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = f"{SOFTWARE_NAME} {__version__} labels".encode()[:79]
    return image


def _rgb01(color: Sequence[float]) -> tuple[float, float, float]:
    values = [float(c) for c in color][:3]
    if len(values) != 3:
        raise ValueError(f"a colour needs three components, got {color!r}")
    if any(v > 1.0 for v in values):
        values = [v / 255.0 for v in values]
    red, green, blue = (min(max(v, 0.0), 1.0) for v in values)
    return (red, green, blue)


def _segment_values(array: np.ndarray, segment_names: Mapping[int, str] | None) -> list[int]:
    present = {int(v) for v in np.unique(array) if v != 0}
    named = {int(v) for v in (segment_names or {}) if int(v) != 0}
    return sorted(present | named)


def write_seg_nrrd(
    labels: np.ndarray,
    like: Volume,
    path: str | Path,
    segment_names: Mapping[int, str] | None = None,
    colors: Mapping[int, Sequence[float]] | None = None,
    overwrite: bool = False,
) -> Path:
    """3D Slicer segmentation (``.seg.nrrd``) via slicerio; returns ``path``.

    One layer whose voxel values are the label values (voxels in i, j, k order, geometry as ``ijkToLPS``); one
    segment per label present or named, with its name (default ``Segment_<value>``) and colour (RGB in [0, 1]
    or 0-255; default :func:`label_color`).
    """
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ImageWriteError(path, "a Slicer segmentation file name ends with .seg.nrrd")
    array = checked_labels(labels, like, path)
    names = {int(k): str(v) for k, v in (segment_names or {}).items()}
    given_colors = {int(k): _rgb01(v) for k, v in (colors or {}).items()}
    voxels = np.ascontiguousarray(array.transpose(2, 1, 0))
    segments = []
    for value in _segment_values(array, names):
        indices = np.nonzero(voxels == value)
        extent = (
            [int(v) for axis in indices for v in (axis.min(), axis.max())]
            if indices[0].size
            else [0, -1] * 3
        )
        segments.append(
            {
                "id": f"Segment_{value}",
                "name": names.get(value, f"Segment_{value}"),
                "nameAutoGenerated": value not in names,
                "color": list(given_colors.get(value, label_color(value))),
                "colorAutoGenerated": value not in given_colors,
                "labelValue": value,
                "layer": 0,
                "extent": extent,
            }
        )
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": like.geometry.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    with atomic_output(path, overwrite) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation)
    return path


def write_dicom_seg(
    labels: np.ndarray,
    like: Volume,
    path: str | Path,
    segment_names: Mapping[int, str] | None = None,
    overwrite: bool = False,
    series_number: int = 901,
    series_description: str = "insid3-med segmentation",
) -> Path:
    """DICOM SEG (highdicom, binary) referencing the DICOM series ``like`` was read from; returns ``path``.

    Segment ``n`` holds the voxels labelled ``n`` (segments 1..max label, named by ``segment_names``, default
    ``Segment n``), with SEMIAUTOMATIC algorithm identification "insid3-med". ``like`` must come from
    :func:`read_volume` on DICOM (its ``metadata["source_files"]`` pair with the slices); otherwise
    :class:`ImageWriteError`.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path)
    files = like.metadata.get("source_files")
    if like.metadata.get("format") != "dicom" or not files:
        source = like.source or "the reference volume"
        raise ImageWriteError(
            path,
            f"DICOM SEG needs a reference volume read from DICOM, but {source} is "
            f"{like.metadata.get('format') or 'not DICOM'}; write NIfTI or .seg.nrrd instead",
        )
    array = checked_labels(labels, like, path)
    multiframe = bool(like.metadata.get("multiframe"))
    if not multiframe and len(files) != like.shape[0]:
        raise ImageWriteError(path, f"{len(files)} source files for {like.shape[0]} slices")
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise ImageWriteError(path, f"cannot read the source DICOM files ({error})") from error
    names = {int(k): str(v) for k, v in (segment_names or {}).items()}
    values = _segment_values(array, names)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE_NAME, family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names.get(number, f"Segment {number}")[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number in range(1, (max(values) if values else 1) + 1)
    ]
    if multiframe:
        # Enhanced multi-frame source: describe the label volume by its geometry (highdicom orders frames).
        ijk_to_lps = like.geometry.ijk_to_lps()
        affine = np.eye(4)
        affine[:3, 0], affine[:3, 1], affine[:3, 2] = (
            ijk_to_lps[:3, 2],
            ijk_to_lps[:3, 1],
            ijk_to_lps[:3, 0],
        )
        affine[:3, 3] = ijk_to_lps[:3, 3]
        pixel_array: hd.Volume | np.ndarray = hd.Volume(
            array,
            affine,
            coordinate_system="PATIENT",
            frame_of_reference_uid=like.metadata["frame_of_reference_uid"],
        )
    else:
        pixel_array = array
    try:
        segmentation = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=SOFTWARE_NAME,
            manufacturer_model_name=SOFTWARE_NAME,
            software_versions=__version__,
            device_serial_number="0",
            series_description=series_description[:64],
            content_label="INSID3",
            content_description="One-shot segmentation by insid3-med",
            omit_empty_frames=bool(array.any()),
        )
    except (ValueError, TypeError, AttributeError) as error:
        raise ImageWriteError(path, f"highdicom cannot build the DICOM SEG ({error})") from error
    with atomic_output(path, overwrite) as temporary:
        segmentation.save_as(temporary)
    return path
