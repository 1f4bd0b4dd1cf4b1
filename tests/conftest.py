"""Shared test fixtures: the real data in ../shared/data, and DICOM series written from real volumes.

The DICOM fixtures are written with pydicom from the real NIfTI volumes (hippocampus MRI as a CT-like series
in HU with a rescale slope/intercept on an oblique grid, ACDC cardiac MRI as a second series) and a real chest
X-ray PNG (as a MONOCHROME1 DX radiograph). File names and InstanceNumbers are shuffled so that slice order
can only come from the patient positions.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from insid3_med.imaging.geometry import Geometry, Volume

DATA_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

HIPPOCAMPUS_IMAGE = "hippocampus/images/hippocampus_007.nii.gz"
HIPPOCAMPUS_LABELS = "hippocampus/labels/hippocampus_007.nii.gz"
ACDC_IMAGE = "acdc/images/patient001_frame01.nii.gz"
ACDC_LABELS = "acdc/labels/patient001_frame01.nii.gz"
BRATS_FLAIR = "brats/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"
BRATS_LABELS = "brats/brats_2013_pat0001_1/OTMultiClass.nii.gz"
CXR_NAME = "2966893D-5DDF-4B68-9E2B-4979D5956C8E.png"
CXR_IMAGE = f"cxr/images/{CXR_NAME}"
CXR_MASK = f"cxr/masks/{CXR_NAME}"
PH2_IMAGE = "ph2/images/IMD002.jpg"
PH2_MASK = "ph2/masks/IMD002_lesion.png"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (../shared/data); skips the test where it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real test data not found at {DATA_DIR} (../shared/data beside the project root)")
    return DATA_DIR


@pytest.fixture(scope="session")
def data_file(shared_data: Path) -> Callable[[str], Path]:
    """``data_file("hippocampus/images/...")`` -> path, skipping the test where that file is absent."""

    def find(relative: str) -> Path:
        path = shared_data / relative
        if not path.exists():
            pytest.skip(f"real test file {relative} not found in {shared_data}")
        return path

    return find


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """(3, 3) proper rotation about ``axis`` (Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u /= np.linalg.norm(u)
    theta = np.deg2rad(degrees)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * np.outer(u, u)


def _base_dataset(sop_class_uid: str, modality: str, study_uid: str, series_uid: str, series_number: int):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Test^Phantom",
        "INSID3-001",
        "19700101",
        "O",
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101010", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
    ds.SeriesNumber, ds.Modality, ds.Manufacturer = series_number, modality, "insid3-med tests"
    ds.ContentDate = datetime.date(2024, 1, 2).strftime("%Y%m%d")
    ds.SamplesPerPixel, ds.BitsAllocated = 1, 16
    return ds


@dataclass
class DicomSeries:
    """A DICOM series written for a test, with the volume it must read back as."""

    folder: Path
    files: list[Path]  # in slice order k
    expected: Volume  # values in modality units (HU for CT) and the grid
    series_uid: str
    study_uid: str
    series_number: int


def write_dicom_series(
    folder: Path,
    values: np.ndarray,
    geometry: Geometry,
    *,
    modality: str = "CT",
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    series_number: int = 1,
    study_uid: str | None = None,
    window: tuple[float, float] | None = None,
    prefix: str = "IM",
    seed: int = 0,
) -> DicomSeries:
    """Write ``values`` (K, J, I), in modality units, as one single-frame-per-slice series on ``geometry``.

    Stored pixels are ``(values - intercept) / slope`` (must be integers in uint16); IPP of slice k is
    ``origin + k * spacing_k * direction_k``; file names and InstanceNumbers are a random permutation of k.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    stored = (np.asarray(values, dtype=np.float64) - rescale_intercept) / rescale_slope
    if not np.allclose(stored, np.round(stored)) or stored.min() < 0 or stored.max() > 65535:
        raise ValueError("values do not map to uint16 stored pixels with this slope/intercept")
    stored = np.round(stored).astype(np.uint16)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    direction = geometry.direction_matrix()
    spacing, origin = np.asarray(geometry.spacing), np.asarray(geometry.origin)
    depth, rows, columns = stored.shape
    permutation = np.random.default_rng(seed).permutation(depth)
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    files = []
    for k in range(depth):
        ds = _base_dataset(sop_class, modality, study_uid, series_uid, series_number)
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = int(permutation[k]) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in origin + k * spacing[2] * direction[:, 2]]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([direction[:, 0], direction[:, 1]])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = rows, columns
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = rescale_slope, rescale_intercept
        if modality == "CT":
            ds.RescaleType = "HU"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"{prefix}{permutation[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    expected = Volume(array=np.asarray(values), geometry=geometry, modality=modality)
    return DicomSeries(folder, files, expected, series_uid, study_uid, series_number)


def oblique_ct_geometry() -> Geometry:
    """A right-handed oblique grid (10 degrees about an off axis), anisotropic spacing, off-centre origin."""
    direction = rotation((0.3, -0.2, 1.0), 10.0) @ np.diag([1.0, 1.0, 1.0])
    return Geometry(
        spacing=(0.7, 0.8, 2.5),
        origin=(-12.5, 30.0, -40.25),
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )


@pytest.fixture(scope="session")
def dicom_series_writer() -> Callable[..., DicomSeries]:
    """The :func:`write_dicom_series` function, for tests that need a series of their own."""
    return write_dicom_series


def _hippocampus_hu(data_file: Callable[[str], Path]) -> np.ndarray:
    import nibabel as nib

    raw = np.asarray(nib.load(data_file(HIPPOCAMPUS_IMAGE)).dataobj, dtype=np.float64).transpose(2, 1, 0)
    return np.round(raw) - 1000.0  # CT-like: about -1000 (air) to 1700 HU, integral


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory, data_file: Callable[[str], Path]) -> DicomSeries:
    """Hippocampus_007 written as a CT series in HU: stored = 2 * (HU + 1024), slope 0.5, intercept -1024,
    oblique grid, window 40/400, shuffled file names (session-wide, do not modify)."""
    folder = tmp_path_factory.mktemp("ct_series")
    return write_dicom_series(
        folder,
        _hippocampus_hu(data_file),
        oblique_ct_geometry(),
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        series_number=3,
        window=(40.0, 400.0),
        prefix="CT",
    )


@pytest.fixture(scope="session")
def two_series_folder(tmp_path_factory: pytest.TempPathFactory, data_file: Callable[[str], Path]):
    """One folder holding TWO series of one study: the CT above (number 3) and ACDC patient001 as MR (number
    7).

    Returns ``(folder, {series_number: DicomSeries})``.
    """
    import nibabel as nib
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("two_series")
    study = generate_uid()
    ct = write_dicom_series(
        folder,
        _hippocampus_hu(data_file),
        oblique_ct_geometry(),
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        series_number=3,
        study_uid=study,
        prefix="A",
        seed=1,
    )
    acdc = np.asarray(nib.load(data_file(ACDC_IMAGE)).dataobj, dtype=np.float64).transpose(2, 1, 0)
    mr_geometry = Geometry(
        spacing=(1.4, 1.4, 8.0),
        origin=(100.0, -80.0, 20.0),
        direction=((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    )
    mr = write_dicom_series(
        folder,
        np.round(acdc * 1000.0),
        mr_geometry,
        modality="MR",
        series_number=7,
        study_uid=study,
        prefix="B",
        seed=2,
    )
    return folder, {3: ct, 7: mr}


@pytest.fixture(scope="session")
def monochrome1_radiograph(tmp_path_factory: pytest.TempPathFactory, data_file: Callable[[str], Path]):
    """The chest X-ray PNG as a 12-bit MONOCHROME1 DX file (stored = 4095 - 16 * png), window 2048/4096.

    Returns ``(dicom_path, png_values (H, W) uint8)``.
    """
    from PIL import Image

    png = np.asarray(Image.open(data_file(CXR_IMAGE)).convert("L"))
    from pydicom.uid import generate_uid

    ds = _base_dataset(DX_IMAGE_STORAGE, "DX", generate_uid(), generate_uid(), 1)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = png.shape
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048.0, 4096.0
    ds.PixelData = (4095 - 16 * png.astype(np.uint16)).astype(np.uint16).tobytes()
    path = tmp_path_factory.mktemp("dx") / "chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, png


def dice_of(predicted: np.ndarray, truth: np.ndarray, value: int) -> float:
    return float(2 * np.sum((predicted == value) & (truth == value))
                 / max(1, np.sum(predicted == value) + np.sum(truth == value)))


@pytest.fixture(scope="session")
def cine(data_file: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real 4D cardiac cine of two phases: ACDC patient001's end-diastole (frame 0) and end-systole (frame 1),
    cut to 96 x 96 pixels around the heart, 10 slices, 25 ms between frames; with the end-diastolic labels kept
    on their slice of largest area only (drawn on frame 0) and both phases' expert labels."""
    folder = tmp_path_factory.mktemp("cine")
    phases = [nib.load(data_file(f"acdc/{kind}/patient001_frame0{n}.nii.gz")) for kind in ("images", "labels")
              for n in (1, 2)]
    ed_labels = np.asarray(phases[2].dataobj)
    x, y = (int(np.mean(np.flatnonzero(ed_labels.any(axis=other)))) for other in ((1, 2), (0, 2)))
    box = np.s_[x - 48:x + 48, y - 48:y + 48]
    ed, es, ed_truth, es_truth = (np.asarray(image.dataobj)[box] for image in phases)
    image = nib.Nifti1Image(np.stack([ed, es], axis=-1).astype(np.float32), phases[0].affine)
    image.header.set_xyzt_units("mm", "msec")
    image.header.set_zooms((*image.header.get_zooms()[:3], 25.0))
    nib.save(image, folder / "cine.nii.gz")
    best = int(np.argmax(np.count_nonzero(ed_truth, axis=(0, 1))))
    drawn = np.zeros_like(ed_truth)
    drawn[:, :, best] = ed_truth[:, :, best]
    nib.save(nib.Nifti1Image(drawn.astype(np.uint8), phases[0].affine), folder / "drawn.nii.gz")
    for name, truth in (("ed_truth", ed_truth), ("es_truth", es_truth)):
        np.save(folder / f"{name}.npy", truth)
    return {"cine": folder / "cine.nii.gz", "drawn": folder / "drawn.nii.gz", "ed": folder / "ed_truth.npy",
            "es": folder / "es_truth.npy"}
