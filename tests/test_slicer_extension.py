"""Plain-Python core of the Slicer extension (slicer_extension/OneShotPropagate/OneShotPropagateLib): no Slicer.

Covers the conversion between Slicer's (K, J, I) arrays + IJKToRAS matrices and ``insid3_med`` volumes (RAS vs
LPS), label arrays, slice and axis choice, parameter validation, command lines, NIfTI exchange files, pinned
requirements and weights paths. The job runner is in test_slicer_jobs.py, MRML nodes in test_slicer_mrml.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from insid3_med.imaging.geometry import Geometry, Volume

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "slicer_extension" / "OneShotPropagate"
DATA = ROOT / ".." / "shared" / "data"
sys.path.insert(0, str(MODULE_DIR))  # Slicer puts each scripted module's folder on sys.path

from OneShotPropagateLib import (  # noqa: E402
    commands,
    conversion,
    dependencies,
    exchange,
    labels,
    slices,
    validation,
    weights,
)


def oblique_ijk_to_ras() -> np.ndarray:
    """An IJKToRAS with rotation, anisotropic spacing and an off-centre origin, as Slicer may hold."""
    angle = np.deg2rad(20.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    ) @ np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.array([0.7, 0.9, 3.0])[None, :]
    matrix[:3, 3] = [12.5, -40.0, 7.25]
    return matrix


# --- conversion: Slicer arrays and matrices <-> Volume / Geometry -------------------------------------------


def test_identity_ijk_to_ras_becomes_lps_with_flipped_first_two_axes():
    ijk_to_ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ijk_to_ras[:3, 3] = [10.0, 20.0, 30.0]
    geometry = conversion.geometry_from_ijk_to_ras(ijk_to_ras)
    assert geometry.origin == pytest.approx((-10.0, -20.0, 30.0))
    assert np.allclose(geometry.direction_matrix(), np.diag([-1.0, -1.0, 1.0]))
    assert geometry.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_oblique_ijk_to_ras_round_trips_and_places_voxels_at_the_same_point():
    ijk_to_ras = oblique_ijk_to_ras()
    geometry = conversion.geometry_from_ijk_to_ras(ijk_to_ras)
    assert np.allclose(conversion.ijk_to_ras_from_geometry(geometry), ijk_to_ras, atol=1e-12)
    assert geometry.spacing == pytest.approx((0.7, 0.9, 3.0))
    voxel = np.array([3.0, 5.0, 2.0, 1.0])
    ras = ijk_to_ras @ voxel
    lps = geometry.ijk_to_lps() @ voxel
    assert np.allclose(lps[:3], ras[:3] * [-1, -1, 1])


def test_volume_from_slicer_copies_the_array_and_keeps_kji_order():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = conversion.volume_from_slicer(array, oblique_ijk_to_ras(), name="CT chest")
    array[0, 0, 0] = -1  # a later edit of Slicer's buffer must not reach the copy
    assert volume.array[0, 0, 0] == 0
    assert volume.shape == (4, 5, 6)
    assert volume.metadata["slicer_node_name"] == "CT chest"
    back, matrix = conversion.slicer_from_volume(volume)
    assert back.shape == (4, 5, 6) and np.allclose(matrix, oblique_ijk_to_ras())


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.eye(3), "4x4"),
        (np.zeros((4, 4)), "last row"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.full((4, 4), np.nan), "NaN"),
    ],
)
def test_bad_ijk_to_ras_is_rejected_with_a_reason(matrix, message):
    with pytest.raises(conversion.ConversionError, match=message):
        conversion.geometry_from_ijk_to_ras(matrix)


def test_volume_from_slicer_rejects_arrays_that_are_not_volumes():
    with pytest.raises(conversion.ConversionError, match="'flat'.*shape"):
        conversion.volume_from_slicer(np.zeros((5, 6)), np.eye(4), name="flat")
    rgb = conversion.volume_from_slicer(np.zeros((1, 5, 6, 3), np.uint8), np.eye(4))
    assert rgb.is_rgb


def test_ijk_to_ras_for_extent_maps_array_origin_to_the_extent_start():
    image_to_world = oblique_ijk_to_ras()
    extent = (4, 9, 2, 7, 3, 5)
    shifted = conversion.ijk_to_ras_for_extent(image_to_world, extent)
    assert np.allclose(shifted @ [0, 0, 0, 1], image_to_world @ [4, 2, 3, 1])
    assert np.allclose(shifted @ [1, 2, 1, 1], image_to_world @ [5, 4, 4, 1])


def test_slicer_affine_of_a_real_nifti_gives_the_same_geometry_as_the_project_reader():
    """Slicer loads a NIfTI with IJKToRAS = its affine; our conversion must agree with insid3_med's reader."""
    path = DATA / "hippocampus" / "images" / "hippocampus_007.nii.gz"
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data is absent on this machine)")
    readers = pytest.importorskip("insid3_med.imaging.readers")
    image = nib.load(path)
    slicer_array = np.asarray(image.dataobj).transpose(2, 1, 0)  # what arrayFromVolume gives: (K, J, I)
    volume = conversion.volume_from_slicer(slicer_array, image.affine)
    reference = readers.read_volume(path)
    assert volume.shape == reference.shape
    assert volume.geometry.allclose(reference.geometry, atol=1e-4)
    np.testing.assert_array_equal(volume.array, reference.array.astype(volume.array.dtype))


# --- labels ----------------------------------------------------------------------------------------------------


def test_merge_segment_masks_gives_first_segment_priority_and_counts_overlap():
    first = np.zeros((2, 3, 4), np.uint8)
    second = np.zeros((2, 3, 4), np.uint8)
    first[0, :2, :2] = 1
    second[0, 1:, 1:] = 1  # overlaps first at [0, 1, 1]
    merged, overlapping = labels.merge_segment_masks([first, second])
    assert overlapping == 1
    assert merged.dtype == np.uint8
    assert merged[0, 1, 1] == 1 and merged[0, 2, 3] == 2 and merged[1].sum() == 0
    masks = labels.split_label_map(merged, 2)
    np.testing.assert_array_equal(masks[0], first)
    assert masks[1].sum() == second.sum() - 1


def test_merge_segment_masks_uses_uint16_beyond_255_segments_and_rejects_bad_input():
    masks = [np.zeros((1, 1, 300), np.uint8) for _ in range(300)]
    for index, mask in enumerate(masks):
        mask[0, 0, index] = 1
    merged, _ = labels.merge_segment_masks(masks)
    assert merged.dtype == np.uint16 and merged.max() == 300
    with pytest.raises(labels.LabelArrayError, match="no segment"):
        labels.merge_segment_masks([])
    with pytest.raises(labels.LabelArrayError, match="shape"):
        labels.merge_segment_masks([np.zeros((2, 2, 2)), np.zeros((2, 2, 3))])


def test_paste_into_extent_places_a_sub_extent_and_crops_what_sticks_out():
    sub = np.arange(2 * 3 * 4).reshape(2, 3, 4) + 1  # (K, J, I) at i 5..8, j 1..3, k 0..1
    full = labels.paste_into_extent(sub, (5, 8, 1, 3, 0, 1), (0, 6, 0, 9, 0, 2))
    assert full.shape == (3, 10, 7)
    np.testing.assert_array_equal(full[0:2, 1:4, 5:7], sub[:, :, 0:2])  # i 7..8 lie outside 0..6
    assert full.sum() == sub[:, :, 0:2].sum()
    assert labels.paste_into_extent(sub, (20, 23, 1, 3, 0, 1), (0, 6, 0, 9, 0, 2)).sum() == 0
    with pytest.raises(labels.LabelArrayError, match="does not match"):
        labels.paste_into_extent(sub, (0, 0, 0, 0, 0, 0), (0, 6, 0, 9, 0, 2))


# --- slices and axes --------------------------------------------------------------------------------------------


def test_labelled_slices_and_automatic_axis():
    label_map = np.zeros((20, 30, 40), np.uint8)
    label_map[7, 10:20, 5:25] = 1
    assert slices.labelled_slices(label_map, 0) == [7]
    assert slices.labelled_slices(label_map, 1) == list(range(10, 20))
    assert slices.choose_propagation_axis(label_map) == 0
    sagittal = np.zeros((20, 30, 40), np.uint8)
    sagittal[2:18, 5:25, 33] = 2
    assert slices.choose_propagation_axis(sagittal) == 2
    with pytest.raises(slices.SliceSelectionError, match="empty"):
        slices.choose_propagation_axis(np.zeros((3, 3, 3)))


def test_array_axis_for_a_view_normal_and_anatomical_plane():
    axial = np.diag([-1.0, -1.0, 1.0, 1.0])  # a typical axial CT series: k runs along S
    assert slices.array_axis_for_normal(axial, [0, 0, 1]) == 0
    assert slices.array_axis_for_normal(axial, [1, 0, 0]) == 2
    assert slices.array_axis_for_normal(axial, [0, -0.9, 0.1]) == 1
    assert slices.anatomical_plane(axial, 0) == "axial"
    assert slices.anatomical_plane(axial, 1) == "coronal"
    assert slices.anatomical_plane(axial, 2) == "sagittal"
    sagittal_series = np.eye(4)
    sagittal_series[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, -1, 0]]  # k runs along R
    assert slices.array_axis_for_normal(sagittal_series, [1, 0, 0]) == 0
    assert slices.anatomical_plane(sagittal_series, 0) == "sagittal"


def test_describe_slices_and_parse_axis():
    assert slices.describe_slices([9, 3, 4, 5]) == "3-5, 9"
    assert slices.describe_slices([]) == "none"
    assert slices.parse_axis("auto") is None and slices.parse_axis(None) is None
    assert [slices.parse_axis(a) for a in ("k", "J", " i ")] == [0, 1, 2]
    with pytest.raises(slices.SliceSelectionError):
        slices.parse_axis("axial")
    with pytest.raises(slices.SliceSelectionError):
        slices.parse_axis(3)


# --- validation -------------------------------------------------------------------------------------------------


def one_slice_labels(shape=(20, 16, 16), labelled=7) -> np.ndarray:
    label_map = np.zeros(shape, np.uint8)
    label_map[labelled, 4:10, 5:12] = 1
    return label_map


def test_plan_propagation_resolves_axis_and_range():
    plan = validation.plan_propagation(one_slice_labels(), validation.PropagationSettings(), volume_shape=(20, 16, 16))
    assert plan.axis == 0 and plan.slice_range == (0, 19) and plan.labelled == (7,)
    assert plan.slices_to_segment == 19
    ranged = validation.plan_propagation(
        one_slice_labels(), validation.PropagationSettings(axis=0, slice_range=(5, 12), device="CUDA:1")
    )
    assert ranged.slice_range == (5, 12) and ranged.slices_to_segment == 7
    assert ranged.settings.device == "cuda:1"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (validation.PropagationSettings(axis=0, slice_range=(9, 12)), "no labelled slice inside the range 9-12"),
        (validation.PropagationSettings(axis=0, slice_range=(12, 5)), "reversed"),
        (validation.PropagationSettings(axis=0, slice_range=(0, 20)), "outside the volume, which has slices 0-19"),
        (validation.PropagationSettings(axis=0, slice_range=(7, 7)), "already labelled"),
        (validation.PropagationSettings(device="tpu"), "unknown device"),
        (validation.PropagationSettings(precision="fp16"), "unknown precision"),
        (validation.PropagationSettings(image_size=50), "image size"),
        (validation.PropagationSettings(axis=5), "array axis"),
    ],
)
def test_plan_propagation_rejects_bad_parameters(settings, message):
    with pytest.raises(validation.ParameterError, match=message):
        validation.plan_propagation(one_slice_labels(), settings)


def test_plan_propagation_needs_labels_on_the_volume_grid():
    with pytest.raises(validation.ParameterError, match="label at least one slice"):
        validation.plan_propagation(np.zeros((4, 4, 4)), validation.PropagationSettings())
    with pytest.raises(validation.ParameterError, match="differs from the volume"):
        validation.plan_propagation(one_slice_labels(), validation.PropagationSettings(), volume_shape=(20, 16, 17))


def test_validate_segments_and_plan_transfer():
    assert validation.validate_segments(["b", "a", "b"], ["a", "b", "c"]) == ["b", "a"]
    with pytest.raises(validation.ParameterError, match="no segment chosen"):
        validation.validate_segments([], ["a"])
    with pytest.raises(validation.ParameterError, match="not in the segmentation"):
        validation.validate_segments(["z"], ["a"])
    plan = validation.plan_transfer(one_slice_labels(), validation.PropagationSettings(), ["vtkMRMLScalarVolumeNode2"])
    assert plan.axis == 0 and plan.labelled == (7,)
    with pytest.raises(validation.ParameterError, match="no target study"):
        validation.plan_transfer(one_slice_labels(), validation.PropagationSettings(), [])
    with pytest.raises(validation.ParameterError, match="twice"):
        validation.plan_transfer(one_slice_labels(), validation.PropagationSettings(), ["a", "a"])


# --- command lines ----------------------------------------------------------------------------------------------


def test_propagate_command_line():
    plan = validation.plan_propagation(
        one_slice_labels(),
        validation.PropagationSettings(slice_range=(3, 11), weights="/w/dinov3_vits16.pth", precision="bf16"),
    )
    command = commands.propagate_command(
        commands.module_command("/opt/Slicer/bin/PythonSlicer"), "v.nii.gz", "l.nii.gz", "out.nii.gz", plan
    )
    assert command == [
        "/opt/Slicer/bin/PythonSlicer", "-m", "insid3_med", "propagate", "v.nii.gz", "l.nii.gz", "-o", "out.nii.gz",
        "--axis", "k", "--precision", "bf16", "--image-size", "448", "--progress", "lines",
        "--weights", "/w/dinov3_vits16.pth", "--slices", "3:12",
    ]  # fmt: skip
    assert "--device" not in command  # "auto" leaves the choice to the tool
    default = validation.plan_propagation(one_slice_labels(), validation.PropagationSettings())
    default_command = commands.propagate_command(["py"], "v.nii.gz", "l.nii.gz", "o.nii.gz", default)
    assert default_command[default_command.index("--precision") + 1] == "auto"  # the tool picks bf16 or fp32
    assert "--set" not in default_command
    accurate = validation.plan_propagation(one_slice_labels(), validation.PropagationSettings(crop_ensemble=True))
    accurate_command = commands.propagate_command(["py"], "v.nii.gz", "l.nii.gz", "o.nii.gz", accurate)
    setting = accurate_command[accurate_command.index("--set") + 1]
    assert setting == "crop_ensemble=1.25,1.5,1.75"
    from insid3_med.propagation import PropagationParams, with_overrides

    assert with_overrides(PropagationParams(), [setting]).crop_ensemble == (1.25, 1.5, 1.75)  # the tool reads it
    unwalked = validation.plan_propagation(one_slice_labels(), validation.PropagationSettings(random_walk=False))
    unwalked_command = commands.propagate_command(["py"], "v.nii.gz", "l.nii.gz", "o.nii.gz", unwalked)
    walk_setting = unwalked_command[unwalked_command.index("--set") + 1]
    assert unwalked_command.count("--set") == 1  # the walk is the tool's default: only turning it off is passed
    assert PropagationParams().random_walk_beta
    assert with_overrides(PropagationParams(), [walk_setting]).random_walk_beta is None


def test_transfer_command_line_and_output_names(tmp_path):
    plan = validation.plan_transfer(one_slice_labels(), validation.PropagationSettings(device="cpu"), ["t"])
    tool = ["py", "-m", "insid3_med"]
    command = commands.transfer_command(tool, "r.nii.gz", "rl.nii.gz", ["a.nii.gz", "b.nii"], "o", plan)
    assert command[:8] == ["py", "-m", "insid3_med", "transfer", "r.nii.gz", "rl.nii.gz", "a.nii.gz", "b.nii"]
    assert command[8:10] == ["-o", "o"] and command[command.index("--device") + 1] == "cpu"
    assert command[command.index("--axis") + 1] == "auto"  # the tool finds the targets' plane from the reference's
    chosen = validation.plan_transfer(one_slice_labels(), validation.PropagationSettings(axis=0), ["t"])
    chosen_command = commands.transfer_command(tool, "r.nii.gz", "rl.nii.gz", ["a.nii.gz"], "o", chosen)
    assert chosen_command[chosen_command.index("--axis") + 1] == "k"
    assert commands.transfer_output_path(tmp_path, "x/target_01.nii.gz") == tmp_path / "target_01_seg.nii.gz"
    assert commands.volume_stem("study.nrrd") == "study" and commands.volume_stem("dicom_folder") == "dicom_folder"
    with pytest.raises(ValueError):
        commands.format_slice_range(4, 2)


def test_find_python_slicer_prefers_the_given_folder(tmp_path):
    launcher = tmp_path / ("PythonSlicer.exe" if sys.platform == "win32" else "PythonSlicer")
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    assert commands.find_python_slicer([tmp_path]) == str(launcher)
    on_path = commands.shutil.which("PythonSlicer")
    assert commands.find_python_slicer([tmp_path / "missing"]) == (on_path or sys.executable)
    assert commands.find_python_slicer([tmp_path / "missing"], fallback=None) == on_path


# --- exchange files ---------------------------------------------------------------------------------------------


def test_exported_volume_is_a_nifti_whose_affine_is_slicers_ijk_to_ras(tmp_path):
    ijk_to_ras = oblique_ijk_to_ras()
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    volume = conversion.volume_from_slicer(array, ijk_to_ras)
    path = exchange.write_volume(volume, tmp_path / "volume.nii.gz")
    image = nib.load(path)
    assert np.allclose(image.affine, ijk_to_ras, atol=1e-4)  # NIfTI affine is RAS, like Slicer's IJKToRAS
    np.testing.assert_allclose(np.asarray(image.dataobj).transpose(2, 1, 0), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume.nii.gz"]  # no partial file left
    with pytest.raises(exchange.ExchangeError, match="already exists"):
        exchange.write_volume(volume, path)


def test_label_map_round_trip_and_reoriented_results_are_mapped_back(tmp_path):
    geometry = conversion.geometry_from_ijk_to_ras(oblique_ijk_to_ras())
    label_map = np.zeros((5, 6, 7), np.uint8)
    label_map[2, 1:4, 2:6] = 3
    label_map[4, 0, 0] = 1
    path = exchange.write_label_map(label_map, geometry, tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(exchange.read_label_map(path, geometry, label_map.shape), label_map)
    # The same grid with voxel axes permuted and one flipped (as a reorienting reader would write it).
    flipped = np.flip(label_map, axis=2).transpose(1, 0, 2)  # (J, K, I) with i reversed
    image = sitk.GetImageFromArray(np.ascontiguousarray(flipped))
    ijk_to_lps = geometry.ijk_to_lps()
    new = np.eye(4)
    new[:3, 0] = -ijk_to_lps[:3, 0]  # new i = old i reversed
    new[:3, 1] = ijk_to_lps[:3, 2]  # new j = old k
    new[:3, 2] = ijk_to_lps[:3, 1]  # new k = old j
    new[:3, 3] = ijk_to_lps[:3, 3] + ijk_to_lps[:3, 0] * 6
    reoriented = Geometry.from_ijk_to_lps(new)
    image.SetSpacing(reoriented.spacing)
    image.SetOrigin(reoriented.origin)
    image.SetDirection(reoriented.direction_matrix().ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "reoriented.nii.gz"))
    np.testing.assert_array_equal(
        exchange.read_label_map(tmp_path / "reoriented.nii.gz", geometry, label_map.shape), label_map
    )


def test_result_on_another_grid_or_with_bad_values_is_refused_naming_the_file(tmp_path):
    geometry = Geometry(spacing=(1.0, 1.0, 2.0))
    shifted = Geometry(spacing=(1.0, 1.0, 2.0), origin=(0.5, 0.0, 0.0))
    path = exchange.write_label_map(np.ones((3, 4, 5), np.uint8), shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(exchange.ExchangeError, match="shifted.nii.gz.*does not match"):
        exchange.read_label_map(path, geometry, (3, 4, 5))
    floats = sitk.GetImageFromArray(np.full((3, 4, 5), 0.5, np.float32))
    floats.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(floats, str(tmp_path / "probabilities.nii.gz"))
    with pytest.raises(exchange.ExchangeError, match="non-integer"):
        exchange.read_label_map(tmp_path / "probabilities.nii.gz", geometry, (3, 4, 5))
    with pytest.raises(exchange.ExchangeError, match="no such result file"):
        exchange.read_label_map(tmp_path / "missing.nii.gz", geometry, (3, 4, 5))
    with pytest.raises(exchange.ExchangeError, match="negative"):
        exchange.write_label_map(np.full((1, 1, 1), -1, np.int16), geometry, tmp_path / "negative.nii.gz")
    rgb = Volume(np.zeros((1, 4, 5, 3), np.uint8))
    with pytest.raises(exchange.ExchangeError, match="grey"):
        exchange.write_volume(rgb, tmp_path / "rgb.nii.gz")


def test_exchange_folder_is_private_and_removed(tmp_path):
    with exchange.ExchangeFolder(tmp_path) as folder:
        assert folder.path.parent == tmp_path and folder.path.is_dir()
        (folder.file("x.nii.gz")).write_bytes(b"x")
        with pytest.raises(exchange.ExchangeError):
            folder.file("../escape.nii.gz")
    assert not folder.path.exists()


# --- requirements ---------------------------------------------------------------------------------------------


def test_parse_requirements_accepts_pins_only():
    pinned = dependencies.parse_requirements("# comment\ninsid3-med==0.1.0\n\nmonai == 1.6.1  # pinned\n")
    assert [str(r) for r in pinned] == ["insid3-med==0.1.0", "monai==1.6.1"]
    with pytest.raises(dependencies.RequirementsError, match="line 2: 'monai>=1.4' is not pinned"):
        dependencies.parse_requirements("nibabel==5.4.2\nmonai>=1.4\n", source="req.txt")
    with pytest.raises(dependencies.RequirementsError, match="listed twice"):
        dependencies.parse_requirements("Pillow==1\npillow==2\n")
    with pytest.raises(dependencies.RequirementsError, match="provided by Slicer"):
        dependencies.parse_requirements("torch==2.13.0\n")


def test_unmet_requirements_reports_missing_and_other_versions():
    pinned = dependencies.parse_requirements("a==1.0\nb==2.0\nc==3.0\n")
    installed = {"a": "1.0", "b": "2.1"}
    unmet = dependencies.unmet_requirements(pinned, installed.get)
    assert [(str(r), found) for r, found in unmet] == [("b==2.0", "2.1"), ("c==3.0", None)]
    assert dependencies.describe_unmet(unmet) == "b==2.0 (installed: 2.1)\nc==3.0 (not installed)"


def test_shipped_requirements_pin_insid3_med_and_every_dependency_it_declares():
    """Resources/requirements.txt must pin the project's version and a version meeting each declared dependency."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {
        dependencies.normalize_name(r.name): r.version
        for r in dependencies.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    }
    import insid3_med

    assert project["dynamic"] == ["version"]  # pyproject reads it from insid3_med.__version__
    assert pinned["insid3-med"] == insid3_med.__version__
    provided = {dependencies.normalize_name(n) for n in dependencies.PROVIDED_BY_SLICER}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = dependencies.normalize_name(requirement.name)
        if name in provided:
            continue
        assert name in pinned, f"{requirement.name} is a dependency of insid3-med but not pinned for Slicer"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} vs {line}"


# --- weights --------------------------------------------------------------------------------------------------


def test_check_weights_path(tmp_path):
    checkpoint = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    checkpoint.write_bytes(b"\0" * 16)
    assert weights.check_weights_path(checkpoint) == str(checkpoint)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(weights.WeightsPathError, match="empty"):
        weights.check_weights_path(tmp_path / "empty.pth")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(weights.WeightsPathError, match="not a weights file"):
        weights.check_weights_path(tmp_path / "notes.txt")
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(weights.WeightsPathError, match="config.json"):
        weights.check_weights_path(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(weights.WeightsPathError, match="no weights file"):
        weights.check_weights_path(folder)
    (folder / "model.safetensors").write_bytes(b"x")
    assert weights.check_weights_path(folder) == str(folder)
    assert weights.check_weights_path("facebook/dinov3-vits16-pretrain-lvd1689m") == (
        "facebook/dinov3-vits16-pretrain-lvd1689m"
    )
    with pytest.raises(weights.WeightsPathError, match="no such file"):
        weights.check_weights_path(tmp_path / "missing.pth")
    with pytest.raises(weights.WeightsPathError, match="no weights chosen"):
        weights.check_weights_path("  ")


def test_the_shared_hugging_face_stand_in_folder_is_accepted():
    folder = ROOT / ".." / "shared" / "weights" / "dinov2-small-standin"
    if not folder.exists():
        pytest.skip(f"{folder} not found")
    assert weights.check_weights_path(folder) == str(folder)


def test_configured_weights_and_help_text():
    assert weights.configured_weights(" /a.pth ", {"INSID3_MED_WEIGHTS": "/b.pth"}) == "/a.pth"
    assert weights.configured_weights(None, {"INSID3_MED_WEIGHTS": "/b.pth"}) == "/b.pth"
    assert weights.configured_weights("", {}) is None
    text = weights.weights_help_html()
    for hub_id in ("facebook/dinov3-vits16-pretrain-lvd1689m", "facebook/dinov3-vitb16-pretrain-lvd1689m",
                   "facebook/dinov3-vitl16-pretrain-lvd1689m"):
        assert hub_id in text
    assert weights.META_REQUEST_URL in text and "gated" in text
