"""DICOM input: find the series in a folder, read one series as a :class:`Volume`, read one radiograph.

Slices are ordered by their position along the slice normal (``ImageOrientationPatient`` row x column
cosines), never by file name or ``InstanceNumber``; the modality LUT (rescale slope/intercept, e.g. stored
values -> HU) is applied slice by slice. The display facts are kept in ``Volume.metadata`` for the intensity
presets and the DICOM SEG writer:

``format`` ("dicom"), ``photometric_interpretation`` (MONOCHROME1 is *flagged*, not inverted: the presets
invert it), ``window_center``/``window_width``/``voi_lut_function`` (first window in the header, if any),
``voi_lut`` (a VOI LUT sequence: ``{"first_mapped", "bits", "data"}``), ``presentation_lut_shape``,
``series_instance_uid``, ``study_instance_uid``, ``frame_of_reference_uid``, ``series_number``,
``series_description``, ``rescale_slope``, ``rescale_intercept``, ``rescale_type``, ``source_files``
(absolute paths, one per slice k, in slice order) and, for a series of single-frame files, ``sop_instance_uids``
(one per slice k, in slice order).

Pixel data is decoded by pydicom, or by SimpleITK (GDCM) when pydicom has no decoder for its transfer syntax;
enhanced multi-frame files go through highdicom.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from insid3_med.imaging.errors import ImageNotFoundError, ImageReadError, SeveralSeriesError
from insid3_med.imaging.geometry import Geometry, Volume, direction_rows, float_triple

_T = TypeVar("_T")

#: Non-image SOP classes that can sit in a series folder (DICOMDIR, SR, SEG, RT structures, presentation
# states...).
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, segmentation, surface segmentation
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
)

#: How far apart (in mm) slices may lie from a regular spacing before the volume is flagged as irregular.
_SPACING_RTOL = 0.01
_ORIENTATION_ATOL = 1e-4


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder. ``files`` are in no particular order (reading sorts them)."""

    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str
    study_instance_uid: str | None
    rows: int | None
    columns: int | None
    files: tuple[Path, ...]

    @property
    def n_files(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        """One line for error messages and the ``info`` command."""
        number = "?" if self.series_number is None else str(self.series_number)
        size = f"{self.rows}x{self.columns}" if self.rows and self.columns else "?x?"
        description = f" '{self.series_description}'" if self.series_description else ""
        return (
            f"series number {number}, {self.modality or '??'}{description}, {self.n_files} file(s) "
            f"of {size}, SeriesInstanceUID {self.series_instance_uid}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready description (no file list, its count only)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "modality": self.modality,
            "series_description": self.series_description,
            "study_instance_uid": self.study_instance_uid,
            "rows": self.rows,
            "columns": self.columns,
            "n_files": self.n_files,
        }


def has_dicom_preamble(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> Dataset | None:
    """Header of a DICOM image file, ``None`` for files that are not DICOM images.

    Raises :class:`ImageReadError` for a file that has the DICOM marker but cannot be parsed (corrupt).
    """
    marked = has_dicom_preamble(path)
    if not marked and path.suffix.lower() not in {".dcm", ".ima", ".dicom", ""}:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not marked)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as error:
        if marked:
            raise ImageReadError(
                path, f"DICOM file cannot be parsed ({type(error).__name__}: {error})"
            ) from error
        return None
    try:
        sop_class = str(ds.get("SOPClassUID", ""))
        media_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if "file_meta" in dir(ds) else ""
        has_series = "SeriesInstanceUID" in ds
    except Exception as error:  # lazily parsed garbage raises assorted errors
        raise ImageReadError(path, f"DICOM file cannot be parsed ({type(error).__name__})") from error
    if marked and not media_class.startswith(_NON_IMAGE_SOP_PREFIXES) and not (sop_class and has_series):
        raise ImageReadError(path, "DICOM file is corrupt: no SOPClassUID or SeriesInstanceUID could be read")
    if not has_series or not sop_class or sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        return None
    if "Rows" not in ds or "Columns" not in ds:
        return None
    return ds


def _iter_files(folder: Path, recursive: bool) -> Iterable[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and not p.name.startswith("."))


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def list_dicom_series(folder: str | Path, recursive: bool = True) -> list[SeriesInfo]:
    """Every image series under ``folder`` (sub-folders too when ``recursive``), sorted by series number.

    Non-DICOM files and non-image objects (DICOMDIR, SR, SEG...) are skipped. A file that has the DICOM marker
    but cannot be parsed raises :class:`ImageReadError` naming it, rather than silently leaving a gap in a
    series.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageNotFoundError(folder, "no such folder")
    if not folder.is_dir():
        raise ImageReadError(folder, "not a folder")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in _iter_files(folder, recursive):
        ds = _read_header(path)
        if ds is not None:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        series.append(
            SeriesInfo(
                series_instance_uid=uid,
                series_number=_int_or_none(first.get("SeriesNumber")),
                modality=str(first.get("Modality", "")) or None,
                series_description=str(first.get("SeriesDescription", "")),
                study_instance_uid=str(first.get("StudyInstanceUID", "")) or None,
                rows=_int_or_none(first.get("Rows")),
                columns=_int_or_none(first.get("Columns")),
                files=tuple(path.resolve() for path, _ in members),
            )
        )
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
    return series


def _listed(items: Sequence[str], most: int) -> str:
    """The first ``most`` items, comma-separated, then how many more there are."""
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def no_series_message(folder: Path) -> str:
    """Why a folder gave no series, with what it holds instead (a folder of NIfTI files is given file by file)."""
    files = list(_iter_files(folder, recursive=True))
    if not files:
        return "no DICOM image series found: the folder holds no files"
    dicom = [path for path in files if has_dicom_preamble(path) or path.name.upper() == "DICOMDIR"]
    if dicom:
        shown = _listed([str(path.relative_to(folder)) for path in dicom], 3)
        return (f"no DICOM image series found in this folder or its sub-folders: its {len(dicom)} DICOM file(s) "
                f"({shown}) hold no images (a segmentation, a report, a DICOMDIR index...)")
    shown = _listed([str(path.relative_to(folder)) for path in files], 3)
    return (f"no DICOM image series found in this folder or its sub-folders; it holds {len(files)} other file(s) "
            f"({shown}): give a NIfTI, NRRD or MetaImage study as its file, not its folder")


def select_series(
    folder: str | Path,
    series: Sequence[SeriesInfo],
    series_uid: str | None = None,
    series_number: int | None = None,
) -> SeriesInfo:
    """The one series picked by UID or number; a clear error listing them all when the choice is missing or
    wrong."""
    listing = "\n  ".join(s.summary() for s in series)
    if not series:
        raise ImageReadError(folder, no_series_message(Path(folder)))
    if series_uid is not None:
        chosen = [s for s in series if s.series_instance_uid == series_uid]
        if not chosen:
            raise ImageReadError(
                folder, f"no series with SeriesInstanceUID {series_uid}; found:\n  {listing}"
            )
        return chosen[0]
    if series_number is not None:
        chosen = [s for s in series if s.series_number == int(series_number)]
        if not chosen:
            raise ImageReadError(
                folder, f"no series with series number {series_number}; found:\n  {listing}"
            )
        if len(chosen) > 1:
            raise ImageReadError(
                folder,
                f"{len(chosen)} series share series number {series_number}; choose by SeriesInstanceUID:"
                f"\n  {listing}",
            )
        return chosen[0]
    if len(series) > 1:
        raise SeveralSeriesError(
            folder,
            f"the folder holds {len(series)} DICOM series; choose one by its series number or SeriesInstanceUID:"
            f"\n  {listing}",
        )
    return series[0]


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        value = [value]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _first_float(value: Any) -> float | None:
    values = _floats(value)
    return values[0] if values else None


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(column spacing = i, row spacing = j) in mm; 1 mm when the header has no spacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        values = _floats(ds.get(keyword))
        if values and len(values) >= 2 and values[0] > 0 and values[1] > 0:
            return float(values[1]), float(values[0])
    return 1.0, 1.0


def _voi_lut(ds: Dataset) -> dict[str, Any] | None:
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    descriptor = [int(v) for v in item.LUTDescriptor]
    first_mapped = descriptor[1]
    if first_mapped >= 2**15 and ds.get("PixelRepresentation", 0) == 1:
        first_mapped -= 2**16
    data = item.LUTData
    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype=np.uint16 if descriptor[2] > 8 else np.uint8)
    return {
        "first_mapped": int(first_mapped),
        "bits": int(descriptor[2]),
        "data": np.asarray(data, dtype=np.float64),
    }


def display_metadata(ds: Dataset) -> dict[str, Any]:
    """Window, VOI LUT, photometric interpretation and identifiers of one DICOM header."""
    meta: dict[str, Any] = {
        "format": "dicom",
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")) or None,
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
        "sop_class_uid": str(ds.get("SOPClassUID", "")) or None,
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "rescale_slope": _first_float(ds.get("RescaleSlope")) or 1.0,
        "rescale_intercept": _first_float(ds.get("RescaleIntercept")) or 0.0,
        "rescale_type": str(ds.get("RescaleType", "")) or None,
    }
    center, width = _first_float(ds.get("WindowCenter")), _first_float(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        meta["window_center"], meta["window_width"] = center, width
        meta["voi_lut_function"] = str(ds.get("VOILUTFunction", "LINEAR")) or "LINEAR"
    voi_lut = _voi_lut(ds)
    if voi_lut is not None:
        meta["voi_lut"] = voi_lut
    if "PresentationLUTShape" in ds:
        meta["presentation_lut_shape"] = str(ds.PresentationLUTShape)
    return meta


def _decode_with_simpleitk(path: Path) -> np.ndarray:
    """Pixel data via SimpleITK/GDCM (which applies the rescale itself): (frames, rows, cols[, 3])."""
    import SimpleITK as sitk

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as error:
        raise ImageReadError(
            path, f"pixel data cannot be decoded ({str(error).strip().splitlines()[-1]})"
        ) from error
    return array if array.ndim >= 3 else array[np.newaxis]


def modality_values(path: Path, ds: Dataset | None = None) -> np.ndarray:
    """Pixel values of one single-frame file after the modality LUT (e.g. HU): (rows, cols) or (rows, cols,
    3)."""
    try:
        if ds is None or "PixelData" not in ds:
            ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except FileNotFoundError as error:
        raise ImageNotFoundError(path, "no such file") from error
    except (InvalidDicomError, EOFError, OSError, TypeError, AttributeError) as error:
        raise ImageReadError(
            path, f"DICOM file cannot be read ({type(error).__name__}: {error})"
        ) from error
    except (RuntimeError, NotImplementedError, ValueError) as error:
        if ds is None:  # dcmread itself failed (for example an unknown VR in a damaged header)
            raise ImageReadError(
                path, f"DICOM file cannot be read ({type(error).__name__}: {error})"
            ) from error
        if "PixelData" not in ds:
            raise ImageReadError(path, "DICOM file holds no pixel data") from error
        try:
            decoded = _decode_with_simpleitk(path)
        except ImageReadError as fallback_error:
            raise ImageReadError(path, f"pixel data cannot be decoded ({error})") from fallback_error
        return decoded[0]
    if stored.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        raise ImageReadError(
            path, f"multi-frame file ({stored.shape[0]} frames) where one frame was expected"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return stored
    return pydicom.pixels.apply_modality_lut(stored, ds)


def _compact(slices: list[np.ndarray]) -> np.ndarray:
    """Stack slices; integral values become int16/int32 (HU fits int16), others float32."""
    array = np.stack(slices)
    if array.dtype.kind == "f":
        if np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)):
            lo, hi = float(array.min()), float(array.max())
            for dtype in (np.int16, np.int32):
                if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                    return array.astype(dtype)
        return array.astype(np.float32)
    return array


def _all_known(values: list[_T | None]) -> TypeGuard[list[_T]]:
    """True when no item of ``values`` is None."""
    return all(value is not None for value in values)


def _orientation(ds: Dataset) -> np.ndarray | None:
    values = _floats(ds.get("ImageOrientationPatient"))
    if not values or len(values) != 6:
        return None
    return np.asarray(values, dtype=np.float64)


def _position(ds: Dataset) -> np.ndarray | None:
    values = _floats(ds.get("ImagePositionPatient"))
    if not values or len(values) != 3:
        return None
    return np.asarray(values, dtype=np.float64)


def _read_multiframe(path: Path, ds: Dataset) -> Volume:
    """An enhanced (multi-frame) CT/MR/PET file as a volume, via highdicom."""
    import highdicom as hd

    try:
        image = hd.imread(str(path))
        hd_volume = image.get_volume(dtype=np.float32)
    except Exception as error:  # highdicom raises many types for unsupported layouts
        raise ImageReadError(
            path, f"multi-frame DICOM cannot be read as one volume ({error})"
        ) from error
    array = np.asarray(hd_volume.array)
    if array.ndim != 3:
        raise ImageReadError(path, f"multi-frame DICOM has shape {array.shape}, not one 3D volume")
    # highdicom indexes (slice, row, column); our ijk is (column, row, slice).
    hd_affine = np.asarray(hd_volume.affine, dtype=np.float64)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0], ijk_to_lps[:3, 1], ijk_to_lps[:3, 2] = (
        hd_affine[:3, 2],
        hd_affine[:3, 1],
        hd_affine[:3, 0],
    )
    ijk_to_lps[:3, 3] = hd_affine[:3, 3]
    if np.dot(np.cross(ijk_to_lps[:3, 0], ijk_to_lps[:3, 1]), ijk_to_lps[:3, 2]) < 0:
        # Same convention as single-frame series: k runs along row x column cosines.
        ijk_to_lps[:3, 3] += (array.shape[0] - 1) * ijk_to_lps[:3, 2]
        ijk_to_lps[:3, 2] *= -1.0
        array = array[::-1]
    metadata = display_metadata(ds)
    metadata["source_files"] = [str(path.resolve())]
    metadata["multiframe"] = True
    return Volume(
        array=_compact(list(array)),
        geometry=Geometry.from_ijk_to_lps(ijk_to_lps),
        modality=str(ds.get("Modality", "")) or None,
        source=path,
        metadata=metadata,
    )


def irregular_spacing_message(source: Path, steps: np.ndarray) -> str:
    """Say where a series' slice spacing (``steps``, mm between neighbouring slices) departs from its usual value,
    and how far the even spacing the volume is read with puts slices from their true positions."""
    usual = float(np.median(steps))
    odd = np.flatnonzero(np.abs(steps - usual) > _SPACING_RTOL * usual + 1e-3)
    places = _listed([f"{steps[n]:.3g} mm between slices {n} and {n + 1}" for n in odd], 3)
    missing = np.all(np.abs(steps[odd] / usual - np.round(steps[odd] / usual)) < 0.05) and np.all(steps[odd] > usual)
    mean = float(np.mean(steps))
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    off = float(np.max(np.abs(positions - mean * np.arange(len(positions)))))
    return (f"{source}: slices are {usual:.3g} mm apart, but {places}"
            f"{' (a missing file?)' if missing else ''}; the volume is read with an even {mean:.4g} mm spacing, "
            f"which puts slices up to {off:.3g} mm from their true positions (so do NIfTI and .seg.nrrd outputs; "
            "a DICOM SEG keeps each slice's own position)")


def _image_header(path: Path) -> Dataset:
    """The header of a DICOM image file; raises naming the file when it is missing or not a DICOM image."""
    if not path.exists():
        raise ImageNotFoundError(path, "no such file")
    ds = _read_header(path)
    if ds is None:
        raise ImageReadError(path, "not a DICOM image file")
    return ds


def _odd_files(paths: Sequence[Path], keys: Sequence[Any], what: str) -> str:
    """Which files differ from the most common ``what`` among a series' files, named (a localizer, a scout or a
    reformat stored in the series), and what to do."""
    common = Counter(keys).most_common(1)[0][0]
    odd = [path.name for path, key in zip(paths, keys, strict=True) if key != common]
    shown = _listed(odd, 5)
    others = sorted({str(key) for key in keys if key != common})
    return (f"{len(odd)} of {len(paths)} files ({shown}) have {what} {', '.join(others)} against {common} for the "
            "rest (a localizer or a reformat kept in the series?); move them to another folder")


def read_dicom_files(files: Sequence[Path], source: Path) -> Volume:
    """The volume made of the given files of ONE series, ordered along the slice normal.

    Raises :class:`ImageReadError` for slices of differing size or orientation, several slices at one position
    (a 4D, multi-echo or multi-phase series), or undecodable pixel data.
    """
    headers = [(Path(path), _image_header(Path(path))) for path in files]
    if not headers:
        raise ImageReadError(source, "no DICOM image files")
    if len(headers) == 1 and int(headers[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(*headers[0])
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in headers):
        raise ImageReadError(
            source, "series mixes multi-frame files with other files; read one file at a time"
        )

    sizes = [(int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))) for _, ds in headers]
    if len(set(sizes)) > 1:
        raise ImageReadError(source, "slices of one series differ in size: "
                             + _odd_files([path for path, _ in headers], sizes, "rows, columns, samples"))
    orientations = [_orientation(ds) for _, ds in headers]
    positions = [_position(ds) for _, ds in headers]
    first = headers[0][1]
    spacing_i, spacing_j = _pixel_spacing(first)
    metadata: dict[str, Any] = {}

    if _all_known(orientations) and _all_known(positions):
        reference = orientations[0]
        if any(not np.allclose(o, reference, atol=_ORIENTATION_ATOL) for o in orientations):
            rounded = [tuple(round(float(v), 3) + 0.0 for v in o) for o in orientations]
            raise ImageReadError(source, "slices of one series have different ImageOrientationPatient: "
                                 + _odd_files([path for path, _ in headers], rounded, "orientation"))
        row_cosine, column_cosine = reference[:3], reference[3:]
        normal = np.cross(row_cosine, column_cosine)
        distances = np.array([float(np.dot(p, normal)) for p in positions])
        order = np.argsort(distances, kind="stable")
        sorted_distances = distances[order]
        steps = np.diff(sorted_distances)
        if np.any(steps < 1e-3):
            duplicates = int(np.sum(steps < 1e-3)) + 1
            raise ImageReadError(
                source,
                f"{duplicates} slices share a position along the slice normal: a 4D, multi-echo or "
                "multi-phase series; only 3D series can be read",
            )
        if len(steps):
            spacing_k = float(np.mean(steps))
            if np.max(np.abs(steps - spacing_k)) > _SPACING_RTOL * spacing_k + 1e-3:
                warnings.warn(irregular_spacing_message(source, steps), stacklevel=3)
                metadata["irregular_slice_spacing"] = [float(s) for s in steps]
        else:
            given_k = _first_float(first.get("SpacingBetweenSlices")) or _first_float(
                first.get("SliceThickness")
            )
            spacing_k = given_k if given_k and given_k > 0 else 1.0
        origin = positions[int(order[0])]
        direction = np.stack([row_cosine, column_cosine, normal], axis=1)
    else:
        # Projection radiographs and secondary captures carry no patient position: order by InstanceNumber.
        numbers = [_int_or_none(ds.get("InstanceNumber")) for _, ds in headers]
        order = np.array(
            sorted(
                range(len(headers)),
                key=lambda n: (numbers[n] is None, numbers[n] or 0, str(headers[n][0])),
            )
        )
        given_k = _first_float(first.get("SpacingBetweenSlices")) or _first_float(
            first.get("SliceThickness")
        )
        spacing_k = given_k if given_k and given_k > 0 else 1.0
        origin = np.zeros(3)
        direction = np.eye(3)
        metadata["patient_position_unknown"] = True

    ordered = [headers[int(n)] for n in order]
    slices = [modality_values(path) for path, _ in ordered]
    metadata.update(display_metadata(first))
    metadata["source_files"] = [str(path.resolve()) for path, _ in ordered]
    metadata["sop_instance_uids"] = [str(ds.get("SOPInstanceUID", "")) for _, ds in ordered]
    slopes = {_first_float(ds.get("RescaleSlope")) or 1.0 for _, ds in ordered}
    intercepts = {_first_float(ds.get("RescaleIntercept")) or 0.0 for _, ds in ordered}
    if len(slopes) > 1 or len(intercepts) > 1:
        metadata["rescale_varies_per_slice"] = True
    geometry = Geometry(
        spacing=(float(spacing_i), float(spacing_j), float(spacing_k)),
        origin=float_triple(origin),
        direction=direction_rows(direction),
    )
    return Volume(
        array=_compact(slices),
        geometry=geometry,
        modality=str(first.get("Modality", "")) or None,
        source=source,
        metadata=metadata,
    )


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None, series_number: int | None = None
) -> Volume:
    """One series of a DICOM folder as a volume (K, J, I) in modality units (HU for CT).

    With several series in the folder, ``series_uid`` (SeriesInstanceUID) or ``series_number`` picks one;
    without a choice the error lists them.
    """
    folder = Path(folder)
    chosen = select_series(folder, list_dicom_series(folder), series_uid, series_number)
    return read_dicom_files(chosen.files, source=folder)


def read_series_of_file(path: str | Path) -> Volume:
    """The whole series one DICOM image file belongs to: every file of its folder (not sub-folders) with the same
    SeriesInstanceUID, as :func:`read_dicom_files` orders them. A multi-frame file is a volume on its own."""
    path = Path(path)
    ds = _image_header(path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return read_dicom_files([path], source=path)
    uid = str(ds.SeriesInstanceUID)
    members = [s for s in list_dicom_series(path.parent, recursive=False) if s.series_instance_uid == uid]
    return read_dicom_files(members[0].files if members else [path], source=path)


def read_dicom_image(path: str | Path) -> Volume:
    """One single-frame DICOM image (radiograph, secondary capture, one CT/MR slice) as a volume with K = 1.

    Grey values are in modality units (MONOCHROME1 kept as stored and flagged in metadata); colour images come
    back as (1, H, W, 3).
    """
    path = Path(path)
    ds = _image_header(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(
            path, f"multi-frame DICOM ({frames} frames): read it as a volume, not a 2D image"
        )
    return read_dicom_files([path], source=path)
