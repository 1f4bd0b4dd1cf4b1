"""The MONAI bundle (monai_bundle/) and its network and transforms (insid3_med/bundle.py).

Bundle runs use the offline stand-in weights, hippocampus volumes copied into tmp_path as the dataset, and a small
input side (112 px) to stay fast on two CPU cores; they check the mechanics (frames, geometry, one output per
study, equality with the library's own result), not accuracy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import dice_of
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImage, LoadImaged, Orientationd

from insid3_med.backbones import load_backbone
from insid3_med.bundle import (
    UNIT_DISPLAY,
    LoadLabelOnImageGridd,
    OneShotNetwork,
    ScaleIntensityPresetd,
    check_outputs_absent,
    labels_to_channel_first,
    list_studies,
    locate_bundle_root,
    reference_preprocessing,
    volume_from_metatensor,
    write_network_state,
)
from insid3_med.imaging.errors import ImageNotFoundError, ImageReadError, OutputExistsError
from insid3_med.imaging.geometry import Geometry, Volume
from insid3_med.imaging.intensity import ct_window, intensity_mapping
from insid3_med.imaging.readers import read_label_volume, read_volume
from insid3_med.imaging.writers import write_dicom_seg, write_nifti_labels, write_seg_nrrd
from insid3_med.predictor import OneShotSegmenter
from insid3_med.volume import transfer_to_study

PROJECT = Path(__file__).resolve().parents[1]
BUNDLE = PROJECT / "monai_bundle"
CONFIG = BUNDLE / "configs" / "inference.json"
MULTI_GPU_CONFIG = BUNDLE / "configs" / "multi_gpu_inference.json"
METADATA = BUNDLE / "configs" / "metadata.json"
STANDIN = PROJECT.parent / "shared" / "weights" / "dinov2-small-standin"
# The bundle metadata schema, copied verbatim from the MONAI-extra-test-data 0.8.1 release asset
# meta_schema_20240725.json (as republished at https://project-monai.github.io/schema/meta_schema_20240725.json).
SCHEMA = Path(__file__).with_name("test_bundle_meta_schema_20240725.json")
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"

REFERENCE = "hippocampus_007"
TARGETS = ("hippocampus_017", "hippocampus_019", "hippocampus_023")
IMAGE_SIZE = 112
MAX_SHOTS = 2


@pytest.fixture(scope="module")
def standin() -> Path:
    if not (STANDIN / "model.safetensors").is_file():
        pytest.skip(f"stand-in weights not found at {STANDIN}")
    return STANDIN


@pytest.fixture(scope="module")
def hippocampus(shared_data: Path) -> Path:
    folder = shared_data / "hippocampus"
    for name in (REFERENCE, *TARGETS):
        if not (folder / "images" / f"{name}.nii.gz").is_file():
            pytest.skip(f"hippocampus volume {name} not found in {folder}")
    return folder


@pytest.fixture(scope="module")
def nifti_dataset(tmp_path_factory: pytest.TempPathFactory, hippocampus: Path) -> Path:
    """tmp/dataset with the three target volumes, plus a text file and an empty folder the listing must skip."""
    folder = tmp_path_factory.mktemp("dataset")
    for name in TARGETS:
        shutil.copy(hippocampus / "images" / f"{name}.nii.gz", folder)
    (folder / "notes.txt").write_text("not a study")
    (folder / "empty").mkdir()
    return folder


@pytest.fixture(scope="module")
def expected_labels(standin: Path, hippocampus: Path) -> dict[str, np.ndarray]:
    """The library's own transfer_to_study result per target, (K, J, I), with the settings the runs use."""
    segmenter = OneShotSegmenter(load_backbone(standin, device="cpu"), image_size=IMAGE_SIZE)
    reference = read_volume(hippocampus / "images" / f"{REFERENCE}.nii.gz")
    labels = read_label_volume(hippocampus / "labels" / f"{REFERENCE}.nii.gz", reference)
    targets = {name: read_volume(hippocampus / "images" / f"{name}.nii.gz") for name in TARGETS}
    return {name: transfer_to_study(segmenter, reference, labels, target, axis="axial", max_shots=MAX_SHOTS,
                                    mode="volume")
            for name, target in targets.items()}


def run_settings(hippocampus: Path, standin: Path) -> dict[str, str | int]:
    """The config entries every run overrides: the reference pair, the weights and the small sizes."""
    return {"reference_image": str(hippocampus / "images" / f"{REFERENCE}.nii.gz"),
            "reference_label": str(hippocampus / "labels" / f"{REFERENCE}.nii.gz"),
            "weights": str(standin), "image_size": IMAGE_SIZE, "max_shots": MAX_SHOTS}


def as_command_line(settings: dict[str, str | int]) -> list[str]:
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def check_outputs(output_dir: Path, dataset: Path, expected: dict[str, np.ndarray]) -> None:
    """One uint8 label map per study, where check_outputs_absent said, on the study's grid, equal to the library's."""
    written = sorted(output_dir.rglob("*.nii.gz"))
    assert [p.name for p in written] == [f"{name}_seg.nii.gz" for name in TARGETS]
    assert written == check_outputs_absent(list_studies(dataset), output_dir, "seg", ".nii.gz", overwrite=True)
    with pytest.raises(OutputExistsError, match="3 output"):
        check_outputs_absent(list_studies(dataset), output_dir, "seg", ".nii.gz")
    for name in TARGETS:
        image = nib.load(dataset / f"{name}.nii.gz")
        output = nib.load(output_dir / name / f"{name}_seg.nii.gz")
        assert output.get_data_dtype() == np.uint8
        assert output.shape == image.shape
        np.testing.assert_allclose(output.affine, image.affine, atol=1e-5)
        written = np.asarray(output.dataobj).transpose(2, 1, 0)
        # MONAI scales intensities to [0, 1] before the network, a library run sees the raw ones: every step is
        # invariant to that up to rounding (measured: identical maps). Before the registration's sampling seed was
        # fixed, Dice here ranged 0.89 to 1.0 from run to run.
        for value in (1, 2):
            a, b = written == value, expected[name] == value
            dice = 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
            assert dice > 0.99, (name, value, dice)
        assert set(np.unique(expected[name])) <= {0, 1, 2} and np.any(expected[name] > 0)


# ---------------------------------------------------------------------------------------------------------------
# Frames, dataset listing, intensities (no weights needed)
# ---------------------------------------------------------------------------------------------------------------


def test_volume_from_metatensor_matches_the_library_reader(hippocampus: Path, ct_series) -> None:
    path = hippocampus / "images" / f"{REFERENCE}.nii.gz"
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    volume = volume_from_metatensor(image)
    library = read_volume(path)
    np.testing.assert_array_equal(volume.array, library.array)
    assert volume.geometry.allclose(library.geometry)
    assert volume.source == path

    dicom = LoadImage(image_only=True, ensure_channel_first=True)(str(ct_series.folder))
    volume = volume_from_metatensor(dicom)
    np.testing.assert_allclose(volume.array, ct_series.expected.array)
    assert volume.geometry.allclose(ct_series.expected.geometry, atol=1e-3)


def test_reoriented_volume_keeps_every_voxel_in_place(ct_series) -> None:
    """Orientationd flips the oblique LPS-like series to RAS: each voxel must still sit at the same LPS point."""
    data = Orientationd(keys="image", axcodes="RAS", labels=None)(
        EnsureChannelFirstd(keys="image")(LoadImaged(keys="image", image_only=True)({"image": str(ct_series.folder)})))
    volume = volume_from_metatensor(data["image"])
    original = ct_series.expected
    assert volume.shape != original.shape or not np.array_equal(volume.array, original.array)  # really reoriented
    rng = np.random.default_rng(0)
    kji = np.stack([rng.integers(0, n, 200) for n in volume.shape], axis=1)
    ijk1 = np.concatenate([kji[:, ::-1], np.ones((len(kji), 1))], axis=1).T
    points = volume.geometry.ijk_to_lps() @ ijk1
    back = np.rint(np.linalg.inv(original.geometry.ijk_to_lps()) @ points).astype(int)[:3][::-1].T
    np.testing.assert_allclose(volume.array[tuple(kji.T)], original.array[tuple(back.T)])


def test_labels_to_channel_first_round_trip() -> None:
    labels = np.random.default_rng(1).integers(0, 4, (5, 6, 7)).astype(np.uint8)  # (K, J, I)
    geometry = Geometry(spacing=(0.5, 0.7, 3.0), origin=(10.0, -4.0, 2.0))
    channel_first = labels_to_channel_first(labels)
    assert channel_first.shape == (1, 7, 6, 5) and channel_first.dtype == torch.uint8
    meta = MetaTensor(channel_first, affine=torch.as_tensor(geometry.ijk_to_ras()))
    back = volume_from_metatensor(meta)
    np.testing.assert_array_equal(back.array, labels)
    assert back.geometry.allclose(geometry)
    lps = MetaTensor(channel_first, affine=torch.as_tensor(geometry.ijk_to_lps()), meta={"space": "LPS"})
    assert volume_from_metatensor(lps).geometry.allclose(geometry)
    with pytest.raises(ValueError, match="one channel"):
        volume_from_metatensor(torch.zeros(2, 3, 4, 5))


def test_list_studies(tmp_path: Path, nifti_dataset: Path, ct_series, two_series_folder) -> None:
    assert list_studies(nifti_dataset) == [str(nifti_dataset / f"{name}.nii.gz") for name in TARGETS]
    shutil.copytree(ct_series.folder, tmp_path / "ct")
    shutil.copy(nifti_dataset / f"{TARGETS[0]}.nii.gz", tmp_path)
    assert list_studies(tmp_path) == [str(tmp_path / "ct"), str(tmp_path / f"{TARGETS[0]}.nii.gz")]
    with pytest.raises(ImageNotFoundError, match="dataset_dir"):
        list_studies(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ImageReadError, match="no study found"):
        list_studies(tmp_path / "nothing")
    folder, _ = two_series_folder
    shutil.copytree(folder, tmp_path / "mixed" / "two_series")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        list_studies(tmp_path / "mixed")


def test_nrrd_and_metaimage_studies_are_listed_and_read_as_the_library_reads_them(
        tmp_path: Path, ct_series, caplog: pytest.LogCaptureFixture) -> None:
    """The formats 3D Slicer and ITK users keep studies in: listed beside NIfTI (a Slicer segmentation and a detached
    header's data file are not studies, and the log names them), and read by the bundle's LoadImaged onto the same
    voxels and geometry as the library reads them (an oblique grid)."""
    import SimpleITK as sitk

    original = ct_series.expected
    image = sitk.GetImageFromArray(original.array.astype(np.int16))
    image.SetSpacing(original.geometry.spacing)
    image.SetOrigin(original.geometry.origin)
    image.SetDirection([float(v) for v in np.asarray(original.geometry.direction).ravel()])
    for name in ("a.nrrd", "b.mha", "c.mhd", "d.nhdr"):
        sitk.WriteImage(image, str(tmp_path / name))
    write_seg_nrrd(np.ones(original.shape, np.uint8), original, tmp_path / "a_label.seg.nrrd")
    (tmp_path / "notes.txt").write_text("not a study")
    with caplog.at_level(logging.INFO, logger="insid3_med.bundle"):
        studies = list_studies(tmp_path)
    assert [Path(s).name for s in studies] == ["a.nrrd", "b.mha", "c.mhd", "d.nhdr"]
    skipped = caplog.text
    assert "a_label.seg.nrrd" in skipped and "notes.txt" in skipped and "c.raw" in skipped
    for study in studies:
        volume = volume_from_metatensor(LoadImage(image_only=True, ensure_channel_first=True)(study))
        np.testing.assert_array_equal(volume.array, original.array)
        assert volume.geometry.allclose(original.geometry, atol=1e-3)
        assert read_volume(study).geometry.allclose(original.geometry, atol=1e-3)


def test_scale_intensity_preset_matches_the_library(hippocampus: Path, ct_series) -> None:
    path = hippocampus / "images" / f"{REFERENCE}.nii.gz"
    load = LoadImaged(keys="image", image_only=True)
    data = ScaleIntensityPresetd(keys="image")(EnsureChannelFirstd(keys="image")(load({"image": str(path)})))
    library = read_volume(path)
    expected = intensity_mapping(library, None).to_unit(library.array)  # the MR preset: volume percentiles
    np.testing.assert_allclose(volume_from_metatensor(data["image"]).array, expected, atol=1e-6)
    assert data["image"].dtype == torch.float32 and data["image"].meta["intensity_preset"] == "mr"

    dicom = EnsureChannelFirstd(keys="image")(load({"image": str(ct_series.folder)}))
    scaled = ScaleIntensityPresetd(keys="image")(dicom)["image"]  # CT with a header window 40/400 (DICOM LINEAR)
    assert scaled.meta["intensity_preset"] == "dicom"
    library = read_volume(ct_series.folder)
    expected = intensity_mapping(library, None).to_unit(library.array)
    np.testing.assert_allclose(volume_from_metatensor(scaled).array, expected, atol=1e-6)
    forced = ScaleIntensityPresetd(keys="image", preset="bone")(dicom)["image"]
    np.testing.assert_allclose(volume_from_metatensor(forced).array, ct_window(ct_series.expected.array, 400, 1800),
                               atol=1e-6)


def test_each_frame_of_a_4d_study_is_scaled_and_read_as_the_command_line_reads_that_frame(
        cine: dict[str, Path]) -> None:
    """A cine's frames are the channels after preprocessing, each scaled on its own as the library scales the frame
    read with ``frame=N``; the reference's label map (drawn on one frame) is one channel on the frames' grid."""
    data = reference_preprocessing()({"image": str(cine["cine"]), "label": str(cine["drawn"])})
    image, label = data["image"], data["label"]
    assert image.shape[0] == 2 and label.shape == (1, *image.shape[1:])
    for frame in (0, 1):
        library = read_volume(cine["cine"], frame=frame)
        expected = intensity_mapping(library, None).to_unit(library.array)
        np.testing.assert_allclose(volume_from_metatensor(image, channel=frame).array, expected, atol=1e-6)
    drawn = read_label_volume(cine["drawn"], read_volume(cine["cine"], frame=0))
    np.testing.assert_array_equal(volume_from_metatensor(label).array, drawn)
    with pytest.raises(ValueError, match="a 4D study"):
        volume_from_metatensor(image)  # no channel chosen


def test_reference_label_reads_dicom_seg_and_cropped_seg_nrrd_onto_the_image_grid(
        ct_series, hippocampus: Path, tmp_path: Path) -> None:
    """The reference's label map is read as the command line reads it: a DICOM SEG of the reference series, or a
    Slicer .seg.nrrd saved cropped to its structure, gives the same labels as a NIfTI label map on the grid."""
    from insid3_med.demo import crop_volume

    transform = reference_preprocessing()
    series = read_volume(ct_series.folder)
    truth = np.asarray(nib.load(hippocampus / "labels" / f"{REFERENCE}.nii.gz").dataobj).transpose(2, 1, 0)
    some = np.zeros(truth.shape, np.uint8)
    some[[10, 20]] = truth[[10, 20]]
    nifti = write_nifti_labels(some, series, tmp_path / "two_slices.nii.gz")
    seg = write_dicom_seg(some, series, tmp_path / "two_slices_seg.dcm", {1: "anterior", 2: "posterior"})
    from_nifti = transform({"image": str(ct_series.folder), "label": str(nifti)})
    from_seg = transform({"image": str(ct_series.folder), "label": str(seg)})
    assert from_seg["label"].shape == from_seg["image"].shape  # (1, X, Y, Z), reoriented to RAS with the image
    np.testing.assert_array_equal(from_seg["label"].numpy(), from_nifti["label"].numpy())
    assert torch.allclose(from_seg["label"].affine, from_seg["image"].affine)
    assert from_seg["label"].meta["filename_or_obj"] == str(seg)

    image = hippocampus / "images" / f"{REFERENCE}.nii.gz"
    volume = read_volume(image)
    labels = read_label_volume(hippocampus / "labels" / f"{REFERENCE}.nii.gz", volume)
    k, j, i = (np.flatnonzero(np.any(labels, axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
    cropped = crop_volume(Volume(labels, volume.geometry), (slice(k[0], k[-1] + 1), slice(j[0], j[-1] + 1),
                                                            slice(i[0], i[-1] + 1)), {})
    assert cropped.shape != labels.shape
    seg_nrrd = write_seg_nrrd(cropped.array, cropped, tmp_path / "cropped.seg.nrrd")
    whole = transform({"image": str(image), "label": str(hippocampus / "labels" / f"{REFERENCE}.nii.gz")})
    placed = transform({"image": str(image), "label": str(seg_nrrd)})
    np.testing.assert_array_equal(placed["label"].numpy(), whole["label"].numpy())

    other = hippocampus / "labels" / f"{TARGETS[0]}.nii.gz"  # another subject's grid: refused, naming the file
    with pytest.raises(ImageReadError, match="voxel grid") as error:
        LoadLabelOnImageGridd(keys="label")({"image": LoadImage(image_only=True)(str(image)), "label": str(other)})
    assert str(other) in str(error.value)


def test_unit_display_maps_scaled_values_to_themselves() -> None:
    values = np.linspace(0.0, 1.0, 101, dtype=np.float32).reshape(1, 1, 101)
    volume = Volume(values, metadata=dict(UNIT_DISPLAY))
    np.testing.assert_array_equal(intensity_mapping(volume, "dicom").to_unit(values), values)


# ---------------------------------------------------------------------------------------------------------------
# Metadata and configs
# ---------------------------------------------------------------------------------------------------------------


def test_metadata_is_valid_against_the_bundle_schema(tmp_path: Path) -> None:
    """Validated with jsonschema against the carried copy of the real schema, then by MONAI's verify_metadata."""
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = json.loads(SCHEMA.read_text())
    metadata = json.loads(METADATA.read_text())
    assert metadata["schema"].endswith("/meta_schema_20240725.json")
    jsonschema.validate(metadata, schema)
    verify_metadata(meta_file=str(METADATA), filepath=str(SCHEMA))
    for key in ("image",):
        fields = metadata["network_data_format"]["inputs"][key]
        assert {"type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
                "channel_def"} <= set(fields)
    assert metadata["network_data_format"]["outputs"]["pred"]["dtype"] == "uint8"
    assert metadata["version"] in metadata["changelog"]
    import insid3_med

    assert metadata["required_packages_version"]["insid3-med"] == insid3_med.__version__  # the package it runs
    broken = {k: v for k, v in metadata.items() if k != "numpy_version"}
    with pytest.raises(jsonschema.ValidationError, match="numpy_version"):
        jsonschema.validate(broken, schema)


def test_configs_define_the_inference_properties() -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIG), str(MULTI_GPU_CONFIG)])
    for key in ("bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer",
                "preprocessing", "postprocessing", "output_dir", "reference_image", "reference_label", "weights"):
        assert key in parser, key
    assert parser.get("dataloader#sampler") == "@sampler"
    assert "$import torch.distributed as dist" in parser.get("imports")
    assert parser.get("weights") == "$os.environ.get('INSID3_MED_WEIGHTS')"
    assert parser.get("postprocessing#transforms#1#_target_") == "SaveImaged"
    assert parser.get("postprocessing#transforms#1#writer") == "$insid3_bundle.AtomicNibabelWriter"


def test_locate_bundle_root(tmp_path: Path) -> None:
    assert Path(locate_bundle_root(PROJECT)) == BUNDLE
    assert Path(locate_bundle_root(BUNDLE)) == BUNDLE
    with pytest.raises(ImageNotFoundError, match="--bundle_root"):
        locate_bundle_root(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The network and its state
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_model_state_is_the_state_of_the_network(standin: Path) -> None:
    """models/model.pt is this network's state for the stand-in at 448 px: it loads strictly and matches."""
    network = OneShotNetwork(weights=standin, image_size=448)
    state = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    assert set(state) == {"positional_basis", "state_fingerprint"}
    assert torch.equal(state["state_fingerprint"], network.state_fingerprint)
    computed = network.positional_basis.clone()
    network.load_state_dict(state, strict=True)
    assert torch.equal(network.positional_basis, state["positional_basis"])
    # Same subspace as the basis this machine computes (the sign of each direction is arbitrary).
    torch.testing.assert_close(state["positional_basis"] @ state["positional_basis"].T, computed @ computed.T,
                               atol=1e-4, rtol=0)


def test_state_for_other_settings_is_not_applied(standin: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    small = OneShotNetwork(weights=standin, image_size=IMAGE_SIZE)
    own = small.positional_basis.clone()
    state = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    with caplog.at_level(logging.WARNING, logger="insid3_med.bundle"):
        small.load_state_dict(state, strict=True)
    assert "computed for other weights or settings" in caplog.text
    assert torch.equal(small.positional_basis, own)

    path = write_network_state(tmp_path / "models" / "model.pt", small)
    other = OneShotNetwork(weights=standin, image_size=IMAGE_SIZE)
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(other.positional_basis, own)
    with pytest.raises(OutputExistsError):
        write_network_state(path, small)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_network_rejects_bad_input(standin: Path, hippocampus: Path, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    image = hippocampus / "images" / f"{REFERENCE}.nii.gz"
    label = hippocampus / "labels" / f"{REFERENCE}.nii.gz"
    bare = OneShotNetwork(weights=standin, image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="no reference"):
        bare(torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ImageNotFoundError, match="reference_label not found"):
        bare.load_reference(image, tmp_path / "missing.nii.gz")
    with pytest.raises(ImageReadError, match="give both"):
        bare.load_reference(image, None)
    other_grid = hippocampus / "labels" / f"{TARGETS[0]}.nii.gz"
    with pytest.raises(ImageReadError, match="voxel grid"):  # not MONAI's RuntimeError around it
        bare.load_reference(image, other_grid)
    empty = tmp_path / "empty.nii.gz"
    write_nifti_labels(np.zeros(read_volume(image).shape, np.uint8), read_volume(image), empty)
    with pytest.raises(ImageReadError, match="no labelled voxel"):
        bare.load_reference(image, empty)
    with pytest.raises(ImageReadError, match="unknown axis 'diagonal'"):
        OneShotNetwork(image, label, weights=standin, image_size=IMAGE_SIZE, axis="diagonal")
    assert OneShotNetwork(image, label, weights=standin, image_size=IMAGE_SIZE, axis="auto").reference is not None
    sagittal = tmp_path / "sagittal.nii.gz"  # one sagittal slice labelled (array axis i), slices taken axially
    full = read_label_volume(label, read_volume(image))
    one = np.zeros_like(full)
    one[:, :, 17] = full[:, :, 17]
    write_nifti_labels(one, read_volume(image), sagittal)
    with caplog.at_level(logging.WARNING, logger="insid3_med.bundle"):
        OneShotNetwork(image, sagittal, weights=standin, image_size=IMAGE_SIZE, axis="axial")
    assert "drawn on 1 slice across" in caplog.text and "(sagittal)" in caplog.text, caplog.text
    network = OneShotNetwork(image, label, weights=standin, image_size=IMAGE_SIZE, max_shots=1)
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\]"):
        network(torch.full((1, 1, 3, 3, 3), 40.0))
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        network(torch.rand(2, 3, 3, 3))


def test_network_takes_volume_mode_settings_and_names_a_bad_one(standin: Path) -> None:
    network = OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, propagation={"gate_sigma": 0.05,
                                                                                   "stop_confidence": None})
    assert network.params.gate_sigma == 0.05 and network.params.stop_confidence is None
    # a config file's list (JSON or Python syntax on the command line) for the crop ensemble
    ensemble = OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, propagation={"crop_ensemble": [1.25, 1.5, 1.75]})
    assert ensemble.params.crop_ensemble == (1.25, 1.5, 1.75)
    assert OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, propagation={}).params is None  # the defaults
    with pytest.raises(ValueError, match="unknown propagation setting 'gate_sgima'"):
        OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, propagation={"gate_sgima": 0.05})
    with pytest.raises(ValueError, match="volume mode only"):
        OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, mode="published", propagation={"top_k": 5})
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    assert parser.get("propagation_settings") == {} and parser.get("network_def#propagation") == "@propagation_settings"


def test_frame_settings_are_checked_and_a_4d_study_or_reference_needs_its_frame(
        standin: Path, hippocampus: Path, cine: dict[str, Path]) -> None:
    """A bad frame setting fails when the network is built; a 4D reference without its reference_frame, or one
    out of range, is refused naming its file; a 4D study without a frame chosen is refused naming it (the bundle
    then skips it)."""
    with pytest.raises(ValueError, match="frame must be null, a frame index .* or 'all', not 'last'"):
        OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, frame="last")
    with pytest.raises(ValueError, match="reference_frame must be null or a frame index"):
        OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, reference_frame="all")
    assert OneShotNetwork(weights=standin, image_size=IMAGE_SIZE, frame="1").frame == 1  # from the command line
    with pytest.raises(ImageReadError, match=r"cine.nii.gz: a 4D image \(2 frames or contrasts\): set "
                                             r"reference_frame to the frame its label map is drawn on \(0 to 1\)"):
        OneShotNetwork(cine["cine"], cine["drawn"], weights=standin, image_size=IMAGE_SIZE)
    with pytest.raises(ImageReadError, match="cine.nii.gz: reference_frame 2 asked of a 4D image with 2 frames"):
        OneShotNetwork(cine["cine"], cine["drawn"], weights=standin, image_size=IMAGE_SIZE, reference_frame=2)
    image = hippocampus / "images" / f"{REFERENCE}.nii.gz"
    with pytest.raises(ImageReadError, match=f"{REFERENCE}.nii.gz: reference_frame 1 asked of a 3D image"):
        OneShotNetwork(image, hippocampus / "labels" / f"{REFERENCE}.nii.gz", weights=standin, image_size=IMAGE_SIZE,
                       reference_frame=1)
    network = OneShotNetwork(cine["cine"], cine["drawn"], weights=standin, image_size=IMAGE_SIZE, reference_frame=0)
    assert network.reference is not None and network.reference.frame == 0
    study = MetaTensor(torch.rand(1, 2, 6, 6, 4), meta={"filename_or_obj": "/data/cine_07.nii.gz"})
    with pytest.raises(ImageReadError, match=r"cine_07.nii.gz: a 4D study \(2 frames or contrasts\); set the "
                                             r"bundle's frame to the one to segment \(0 to 1\) or to 'all'"):
        network(study)
    network.frame = 3
    with pytest.raises(ImageReadError, match="cine_07.nii.gz: frame 3 asked of a 4D study with 2 frames"):
        network(study)


def test_verify_net_in_out(standin: Path, hippocampus: Path) -> None:
    """MONAI's check: a random (1, 1, 8, 8, 8) image through network_def gives one uint8 channel."""
    verify_net_in_out(net_id="network_def", meta_file=str(METADATA), config_file=str(CONFIG), device="cpu", any=8,
                      **run_settings(hippocampus, standin))


# ---------------------------------------------------------------------------------------------------------------
# Bundle runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging_and_path():
    """ConfigWorkflow applies logging.conf to the root logger and puts the bundle root on sys.path."""
    root = logging.getLogger()
    handlers, level, path = list(root.handlers), root.level, list(sys.path)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.path[:] = path


def test_config_workflow_on_a_dicom_study_that_is_its_own_reference(
        tmp_path: Path, standin: Path, ct_series, hippocampus: Path, restore_logging_and_path) -> None:
    """As the model-zoo CI runs a bundle: initialize, check_properties, run, finalize.

    The study is an oblique DICOM CT series (which MONAI reorients to RAS and back) labelled on two of its slices:
    the output must be on the series' grid and keep those two slices exactly.
    """
    dataset = tmp_path / "dataset"
    shutil.copytree(ct_series.folder, dataset / "ct_007")
    study = read_volume(dataset / "ct_007")
    full = np.asarray(nib.load(hippocampus / "labels" / f"{REFERENCE}.nii.gz").dataobj).transpose(2, 1, 0)
    slices = [k for k in range(full.shape[0]) if full[k].any()][::6][:2]
    partial = np.zeros_like(full, dtype=np.uint8)
    partial[slices] = full[slices]
    label_path = write_nifti_labels(partial, study, tmp_path / "ct_007_partial.nii.gz")
    output_dir = tmp_path / "out"
    workflow = ConfigWorkflow(
        config_file=str(CONFIG), meta_file=str(METADATA), logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type="infer", bundle_root=str(BUNDLE), dataset_dir=str(dataset), output_dir=str(output_dir),
        reference_image=str(dataset / "ct_007"), reference_label=str(label_path), weights=str(standin),
        image_size=IMAGE_SIZE, separate_folder=False)
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()
    workflow.finalize()
    written = sorted(output_dir.iterdir())
    assert [p.name for p in written] == ["ct_007_seg.nii.gz"]
    output = read_volume(written[0])
    assert output.shape == study.shape
    assert output.geometry.allclose(study.geometry, atol=1e-3)
    labels = output.array.astype(np.int64)
    np.testing.assert_array_equal(labels[slices], partial[slices])
    others = [k for k in range(labels.shape[0]) if k not in slices]
    assert labels[others].any(), "nothing propagated to the unlabelled slices"

    again = ConfigWorkflow(config_file=str(CONFIG), meta_file=str(METADATA), logging_file=False, workflow_type="infer",
                           bundle_root=str(BUNDLE), dataset_dir=str(dataset), output_dir=str(output_dir),
                           separate_folder=False)
    with pytest.raises(RuntimeError) as error:
        again.initialize()  # refuses before anything is built or written
    assert isinstance(error.value.__cause__, OutputExistsError)
    assert sorted(output_dir.iterdir()) == written


@pytest.mark.slow
def test_bundle_run_command(tmp_path: Path, nifti_dataset: Path, hippocampus: Path, standin: Path,
                            expected_labels: dict[str, np.ndarray]) -> None:
    """`python -m monai.bundle run --config_file monai_bundle/configs/inference.json ...` from the project root."""
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "monai_bundle/configs/inference.json",
               "--dataset_dir", str(nifti_dataset), "--output_dir", str(output_dir),
               *as_command_line(run_settings(hippocampus, standin))]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_outputs(output_dir, nifti_dataset, expected_labels)


def test_a_bundle_run_goes_on_past_unreadable_studies_and_ends_with_exit_2(tmp_path: Path, hippocampus: Path,
                                                                          standin: Path) -> None:
    """A truncated study and a 4D one among a hospital folder's studies: each is logged as skipped with why, the
    others are segmented and written, and the run ends with exit code 2 listing the skipped ones (before, the first
    unreadable study ended the whole run with a MONAI traceback and the studies after it were never segmented)."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    reference = hippocampus / "images" / f"{REFERENCE}.nii.gz"
    (dataset / "b_broken.nii.gz").write_bytes(reference.read_bytes()[:3000])
    image = nib.load(reference)
    nib.save(nib.Nifti1Image(np.stack([np.asarray(image.dataobj)] * 2, axis=-1), image.affine),
             dataset / "c_4d.nii.gz")
    (dataset / "d_reference.nii.gz").symlink_to(reference)  # the reference itself (its labels propagate): after them
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "monai_bundle/configs/inference.json",
               "--dataset_dir", str(dataset), "--output_dir", str(output_dir),
               *as_command_line(run_settings(hippocampus, standin))]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert f"skipped {dataset / 'b_broken.nii.gz'}: EOFError" in log
    assert (f"skipped {dataset / 'c_4d.nii.gz'}: a 4D study (2 frames or contrasts); set the bundle's frame" in log)
    assert "2 studies skipped, not segmented" in log and "Traceback" not in log
    written = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*") if p.is_file())
    assert written == [Path("d_reference/d_reference_seg.nii.gz")]


def test_a_bundle_run_segments_every_frame_of_a_cine_or_the_frame_chosen(
        tmp_path: Path, standin: Path, cine: dict[str, Path], restore_logging_and_path) -> None:
    """A 4D cine in the dataset, labelled on one slice of its end-diastolic frame (reference_frame 0). With frame
    'all' one 4D label map comes out on the cine's grid, its 25 ms between frames and their unit kept: the labelled
    frame filled by propagation, end-systole (never labelled) segmented better than the end-diastolic result
    carried over unchanged. With frame 1 the label map of that frame alone: frame 1 of the former."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    shutil.copy(cine["cine"], dataset / "cine.nii.gz")
    outputs = {}
    for frame in ("all", 1):
        output_dir = tmp_path / f"out_{frame}"
        workflow = ConfigWorkflow(
            config_file=str(CONFIG), meta_file=str(METADATA), logging_file=False, workflow_type="infer",
            bundle_root=str(BUNDLE), dataset_dir=str(dataset), output_dir=str(output_dir),
            reference_image=str(dataset / "cine.nii.gz"), reference_label=str(cine["drawn"]), reference_frame=0,
            frame=frame, weights=str(standin), image_size=224, separate_folder=False)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        assert [p.name for p in output_dir.iterdir()] == ["cine_seg.nii.gz"]
        outputs[frame] = nib.load(output_dir / "cine_seg.nii.gz")
    every, source = outputs["all"], nib.load(cine["cine"])
    assert every.shape == source.shape and every.get_data_dtype() == np.uint8
    assert np.allclose(every.affine, source.affine) and every.header.get_zooms()[3] == 25.0
    assert every.header.get_xyzt_units() == ("mm", "msec")
    frames = np.asarray(every.dataobj)
    drawn = np.asarray(nib.load(cine["drawn"]).dataobj)
    labelled = drawn.any(axis=(0, 1))
    np.testing.assert_array_equal(frames[..., 0][..., labelled], drawn[..., labelled])
    ed_truth, es_truth = np.load(cine["ed"]), np.load(cine["es"])
    assert np.mean([dice_of(frames[..., 0], ed_truth, value) for value in (1, 2, 3)]) > 0.7
    carried = np.mean([dice_of(frames[..., 0], es_truth, value) for value in (1, 2, 3)])
    segmented = np.mean([dice_of(frames[..., 1], es_truth, value) for value in (1, 2, 3)])
    assert segmented > carried + 0.05, (segmented, carried)
    one = outputs[1]
    assert one.shape == source.shape[:3] and np.allclose(one.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(one.dataobj), frames[..., 1])


def test_the_batch_skipping_pieces_are_wired_into_the_config() -> None:
    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert config["dataset"]["_target_"] == "insid3_med.bundle.ReadableStudies"
    assert config["dataloader"]["collate_fn"] == "$insid3_bundle.collate_readable"
    assert config["evaluator"]["iteration_update"] == "$insid3_bundle.skip_unreadable"
    assert config["run"][-1] == "$insid3_bundle.report_skipped(@evaluator)"
    from insid3_med.bundle import collate_readable

    marker = {"unreadable": "x.nii.gz", "reason": "EOFError: truncated"}
    assert collate_readable([marker]) == {"unreadable": ["x.nii.gz"], "reason": ["EOFError: truncated"]}
    with pytest.raises(ValueError, match="batch_size 1"):
        collate_readable([marker, {"image": torch.zeros(1, 2, 2, 2)}])


@pytest.mark.slow
def test_bundle_runs_distributed_on_two_cpu_processes(tmp_path: Path, nifti_dataset: Path, hippocampus: Path,
                                                      standin: Path, expected_labels: dict[str, np.ndarray]) -> None:
    """torchrun with two gloo processes: every study is segmented exactly once, by one of the two ranks."""
    output_dir = tmp_path / "out"
    configs = "['monai_bundle/configs/inference.json','monai_bundle/configs/multi_gpu_inference.json']"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "--config_file", configs,
               "--dataset_dir", str(nifti_dataset), "--output_dir", str(output_dir),
               *as_command_line(run_settings(hippocampus, standin))]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    segmented = re.findall(r"/(hippocampus_\d+)\.nii\.gz: labels .* \[rank (\d)/2\]", log)
    assert sorted(name for name, _ in segmented) == sorted(TARGETS), segmented  # each study exactly once
    assert {rank for _, rank in segmented} == {"0", "1"}, segmented  # both processes worked
    check_outputs(output_dir, nifti_dataset, expected_labels)



# ---------------------------------------------------------------------------------------------------------------
# Writing the outputs
# ---------------------------------------------------------------------------------------------------------------


def bundle_save_transform(output_dir: Path) -> object:
    """The configured SaveImaged, as the bundle builds it (inference.json's postprocessing, last transform)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["bundle_root"] = str(BUNDLE)
    parser["output_dir"] = str(output_dir)
    parser["separate_folder"] = False
    return parser.get_parsed_content("postprocessing").transforms[-1]


def label_prediction(path: str, value: int) -> dict[str, MetaTensor]:
    array = torch.full((1, 6, 5, 4), value, dtype=torch.uint8)
    return {"pred": MetaTensor(array, affine=torch.eye(4), meta={"filename_or_obj": path})}


def test_bundle_writes_each_label_map_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that fails half-way leaves neither a partial file nor a temporary one, and keeps the earlier file."""
    save = bundle_save_transform(tmp_path)
    save(label_prediction("/data/case_01.nii.gz", 2))
    written = tmp_path / "case_01_seg.nii.gz"
    np.testing.assert_array_equal(np.asanyarray(nib.load(written).dataobj), np.full((6, 5, 4), 2))

    def fails_half_way(image: nib.Nifti1Image, filename: str) -> None:
        Path(filename).write_bytes(b"\x1f\x8b truncated")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fails_half_way)
    with pytest.raises(Exception, match="disk full"):
        save(label_prediction("/data/case_01.nii.gz", 3))
    with pytest.raises(Exception, match="disk full"):
        save(label_prediction("/data/case_02.nii.gz", 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_01_seg.nii.gz"]
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asanyarray(nib.load(written).dataobj), np.full((6, 5, 4), 2))


def test_sigterm_while_writing_ends_the_run_with_143_and_no_temporary(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The configs' initialize calls exit_on_sigterm: a SIGTERM (torchrun stopping the other workers after one
    failed, a scheduler) arriving while a label map is written leaves no temporary file (it died there before)."""
    import signal

    from insid3_med.bundle import exit_on_sigterm

    save = bundle_save_transform(tmp_path)
    nifti_save = nib.save

    def terminated_while_writing(image: nib.Nifti1Image, filename: str) -> None:
        nifti_save(image, filename)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(nib, "save", terminated_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    try:
        exit_on_sigterm()
        with pytest.raises(SystemExit) as exit_:
            save(label_prediction("/data/case_01.nii.gz", 2))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exit_.value.code == 143 and list(tmp_path.iterdir()) == []
    for name in ("inference.json", "multi_gpu_inference.json"):
        assert "$insid3_bundle.exit_on_sigterm()" in json.loads((BUNDLE / "configs" / name).read_text())["initialize"]


def test_no_output_replaces_an_input_even_with_overwrite(tmp_path: Path) -> None:
    studies = [tmp_path / "case_01.nii.gz", tmp_path / "case_02.nii.gz"]
    for study in studies:
        study.write_bytes(b"study")
    reference_label = tmp_path / "labels" / "case_01.nii.gz"
    # An empty postfix in the dataset folder names each study itself.
    with pytest.raises(OutputExistsError, match="replace an input.*case_01.nii.gz|case_01.nii.gz.*replace an input"):
        check_outputs_absent(studies, tmp_path, "", ".nii.gz", separate_folder=False, overwrite=True)
    # The reference label map is an input too, even where it is not one of the studies.
    reference_label.parent.mkdir()
    reference_label.write_bytes(b"label")
    with pytest.raises(OutputExistsError, match="replace an input"):
        check_outputs_absent(studies[:1], reference_label.parent, "", ".nii.gz", separate_folder=False,
                             overwrite=True, inputs=[None, reference_label])
    planned = check_outputs_absent(studies, tmp_path, "seg", ".nii.gz", separate_folder=False, overwrite=True,
                                   inputs=[studies[0], reference_label])
    assert planned == [tmp_path / "case_01_seg.nii.gz", tmp_path / "case_02_seg.nii.gz"]
    assert all(study.read_bytes() == b"study" for study in studies)
