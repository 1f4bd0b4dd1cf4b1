"""The Slicer extension's MRML adapter (OneShotPropagateLib.mrml) on a real ``vtkMRMLScene`` from PyPI ``slicer-core``.

``slicer-core`` is Slicer's Qt-free MRML core (real volume and segmentation nodes, Slicer's own NIfTI reader and
segmentation logic), but not the application: there is no ``slicer.mrmlScene`` and no Segmentations module, so the
fixture below registers the segmentation converter rules that the Segmentations module registers at Slicer's
startup. Skipped where ``slicer-core`` is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from insid3_med.imaging.geometry import Geometry, Volume

slicer = pytest.importorskip("slicer", reason="PyPI slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' module is not slicer-core", allow_module_level=True)
import vtk  # noqa: E402  (installed with slicer-core)

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "slicer_extension" / "OneShotPropagate"
STAND_IN = MODULE_DIR / "Testing" / "Python" / "stand_in_insid3_med.py"
DATA = ROOT / ".." / "shared" / "data"
sys.path.insert(0, str(MODULE_DIR))

from OneShotPropagateLib import conversion, jobs, labels, mrml, runs, validation  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def segmentation_converters():
    """Stands in for Slicer's Segmentations module, which registers these rules when Slicer starts."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def oblique_geometry() -> Geometry:
    angle = np.deg2rad(25.0)
    # A proper rotation (determinant +1) about the anterior-posterior axis.
    direction = np.array([[np.cos(angle), 0.0, -np.sin(angle)], [0.0, 1.0, 0.0], [np.sin(angle), 0.0, np.cos(angle)]])
    return Geometry(spacing=(0.75, 0.6, 3.0), origin=(-30.0, 12.5, 44.0),
                    direction=tuple(tuple(float(v) for v in row) for row in direction))


def load_with_slicer_reader(scene, path: Path):
    """A volume node read by Slicer's own file reader (vtkMRMLVolumeArchetypeStorageNode)."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name)
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


def segmentation_for(scene, volume_node, segments: dict[str, tuple[str, tuple[float, float, float]]]):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for segment_id, (name, color) in segments.items():
        node.GetSegmentation().AddEmptySegment(segment_id, name, color)
    return node


def test_volume_node_round_trip_keeps_voxels_and_geometry(scene):
    geometry = oblique_geometry()
    volume = Volume(np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32), geometry)
    node = mrml.add_volume_node(scene, volume, "CT")
    assert np.allclose(mrml.node_ijk_to_ras(node), geometry.ijk_to_ras(), atol=1e-9)
    # Slicer keeps the origin in RAS; the Volume keeps it in LPS.
    assert np.allclose(node.GetOrigin(), np.asarray(geometry.origin) * [-1, -1, 1])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), volume.array)
    back = mrml.volume_from_node(node)
    assert back.geometry.allclose(geometry, atol=1e-9)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.metadata["slicer_node_name"] == "CT"


def same_voxels_at_same_places(a: Volume, b: Volume) -> None:
    """Both volumes hold the same value at every physical point of a's grid (whatever their axis order)."""
    a_to_b = np.linalg.inv(b.geometry.ijk_to_lps()) @ a.geometry.ijk_to_lps()
    k, j, i = np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    mapped = a_to_b @ ijk
    assert np.allclose(mapped, np.round(mapped), atol=1e-3), "grids are not the same voxels"
    bi, bj, bk = np.round(mapped[:3]).astype(int)
    np.testing.assert_array_equal(b.array[bk, bj, bi], a.array[k.ravel(), j.ravel(), i.ravel()])


@pytest.mark.parametrize("handedness", ["right-handed", "left-handed"])
def test_slicers_reader_and_the_project_reader_agree_through_the_conversion(scene, tmp_path, handedness):
    """An oblique NIfTI read by Slicer and converted must hold the same voxels at the same places as the file
    read by insid3_med (Slicer flips an axis of left-handed grids, so the arrays may differ by that flip)."""
    readers = pytest.importorskip("insid3_med.imaging.readers")
    geometry = oblique_geometry()
    if handedness == "left-handed":
        direction = geometry.direction_matrix() * [1, 1, -1]
        geometry = Geometry(geometry.spacing, geometry.origin, tuple(tuple(float(v) for v in r) for r in direction))
    array = np.random.default_rng(2).integers(0, 1000, size=(5, 9, 11)).astype(np.int16)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), geometry.ijk_to_ras()), path)
    node = load_with_slicer_reader(scene, path)
    from_slicer = mrml.volume_from_node(node)
    from_project = readers.read_volume(path)
    same_voxels_at_same_places(from_slicer, from_project)
    same_voxels_at_same_places(from_project, from_slicer)
    if handedness == "right-handed":
        assert from_slicer.geometry.allclose(from_project.geometry, atol=1e-4)
        np.testing.assert_array_equal(from_slicer.array, array)


def test_real_study_read_by_slicer_converts_like_the_project_reader(scene):
    path = DATA / "brats"
    files = sorted(path.glob("*/T1c_subtrMeanDivStd.nii.gz")) if path.exists() else []
    if not files:
        pytest.skip(f"real data not found under {path}")
    readers = pytest.importorskip("insid3_med.imaging.readers")
    node = load_with_slicer_reader(scene, files[0])
    volume = mrml.volume_from_node(node)
    reference = readers.read_volume(files[0])
    assert volume.shape == reference.shape
    assert volume.geometry.allclose(reference.geometry, atol=1e-4)
    np.testing.assert_allclose(volume.array, reference.array, rtol=1e-6)


def test_segment_masks_round_trip_and_merge_without_leaving_temporary_nodes(scene):
    volume_node = mrml.add_volume_node(scene, Volume(np.zeros((6, 7, 8), np.float32), oblique_geometry()), "v")
    segmentation = segmentation_for(scene, volume_node, {"liver": ("Liver", (0.8, 0.4, 0.2)),
                                                         "lesion": ("Lesion", (1.0, 1.0, 0.0))})
    liver = np.zeros((6, 7, 8), np.uint8)
    liver[2, 1:5, 1:6] = 1
    lesion = np.zeros((6, 7, 8), np.uint8)
    lesion[2, 3:6, 4:8] = 1
    mrml.set_segment_masks(segmentation, ["liver", "lesion"], [liver, lesion], volume_node)
    masks = mrml.segment_masks(segmentation, ["liver", "lesion"], volume_node)
    np.testing.assert_array_equal(masks[0], liver)
    np.testing.assert_array_equal(masks[1], lesion)
    label_map, overlapping = mrml.label_map_from_segments(segmentation, ["lesion", "liver"], volume_node)
    assert overlapping == int((liver & lesion).sum()) > 0
    assert (label_map == 1).sum() == lesion.sum()  # the first listed segment wins the overlap
    # No temporary label map, display or colour table node is left behind.
    for class_name in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLLabelMapVolumeDisplayNode", "vtkMRMLColorTableNode"):
        assert scene.GetNumberOfNodesByClass(class_name) == 0, class_name
    with pytest.raises(mrml.MRMLAdapterError, match="'spleen' is not in"):
        mrml.segment_masks(segmentation, ["spleen"], volume_node)


def test_real_label_slice_through_a_segmentation_node(scene):
    image_path = DATA / "hippocampus" / "images" / "hippocampus_007.nii.gz"
    labels_path = DATA / "hippocampus" / "labels" / "hippocampus_007.nii.gz"
    if not image_path.exists():
        pytest.skip(f"real data not found at {image_path}")
    volume_node = load_with_slicer_reader(scene, image_path)
    truth = np.asarray(nib.load(labels_path).dataobj).transpose(2, 1, 0)
    k = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    segmentation = segmentation_for(scene, volume_node, {"anterior": ("Anterior", (1, 0, 0)),
                                                         "posterior": ("Posterior", (0, 1, 0))})
    slice_masks = []
    for value in (1, 2):
        mask = np.zeros(truth.shape, np.uint8)
        mask[k] = truth[k] == value
        slice_masks.append(mask)
    mrml.set_segment_masks(segmentation, ["anterior", "posterior"], slice_masks, volume_node)
    label_map, overlapping = mrml.label_map_from_segments(segmentation, ["anterior", "posterior"], volume_node)
    assert overlapping == 0
    expected = np.zeros_like(truth)
    expected[k] = truth[k]
    np.testing.assert_array_equal(label_map, expected)


def test_oriented_image_with_an_offset_extent_keeps_world_positions():
    image_to_world = oblique_geometry().ijk_to_ras()
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    extent = (5, 8, 10, 12, 3, 4)
    image = mrml.array_to_oriented_image(array, image_to_world, extent)
    back, matrix, back_extent = mrml.oriented_image_to_array(image)
    np.testing.assert_array_equal(back, array)
    assert back_extent == extent and np.allclose(matrix, image_to_world)
    ijk_to_ras = conversion.ijk_to_ras_for_extent(matrix, back_extent)
    # Array voxel (k=1, j=2, i=3) is image extent index (5+3, 10+2, 3+1): the same world point both ways.
    image_matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_matrix)
    assert np.allclose((ijk_to_ras @ [3, 2, 1, 1])[:3], image_matrix.MultiplyPoint([8, 12, 4, 1])[:3])
    assert back[1, 2, 3] == array[1, 2, 3]
    with pytest.raises(labels.LabelArrayError, match="does not match extent"):
        mrml.array_to_oriented_image(array, image_to_world, (0, 1, 0, 1, 0, 1))


def test_new_segmentation_for_another_study_copies_names_and_colours(scene):
    reference = mrml.add_volume_node(scene, Volume(np.zeros((3, 4, 5), np.float32), oblique_geometry()), "baseline")
    target = mrml.add_volume_node(scene, Volume(np.zeros((4, 4, 5), np.float32), Geometry()), "follow-up")
    template = segmentation_for(scene, reference, {"a": ("Tumour", (1.0, 0.5, 0.0)), "b": ("Oedema", (0, 0, 1))})
    created = mrml.new_segmentation_like(template, ["b"], target, "follow-up one-shot segmentation")
    assert mrml.segment_ids(created) == ["b"]
    assert mrml.segment_names(created, ["b"]) == ["Oedema"]
    assert created.GetSegmentation().GetSegment("b").GetColor() == pytest.approx((0.0, 0.0, 1.0))
    mask = np.zeros((4, 4, 5), np.uint8)
    mask[1:3, 1:3, 2:4] = 1
    mrml.set_segment_masks(created, ["b"], [mask], target)
    np.testing.assert_array_equal(mrml.segment_masks(created, ["b"], target)[0], mask)


def test_whole_propagation_from_nodes_to_nodes_with_the_stand_in_tool(scene, tmp_path):
    """What the module's logic does, on real MRML nodes; the STAND-IN tool (copies the nearest labelled slice)
    replaces insid3-med so that only the plumbing is tested here."""
    geometry = oblique_geometry()
    volume_node = mrml.add_volume_node(scene, Volume(np.ones((9, 10, 11), np.float32), geometry), "study")
    segmentation = segmentation_for(scene, volume_node, {"s1": ("Kidney", (1, 0, 0)), "s2": ("Cyst", (0, 1, 0))})
    kidney = np.zeros((9, 10, 11), np.uint8)
    kidney[4, 2:8, 2:9] = 1
    cyst = np.zeros((9, 10, 11), np.uint8)
    cyst[4, 0:2, 0:3] = 1
    mrml.set_segment_masks(segmentation, ["s1", "s2"], [kidney, cyst], volume_node)

    volume = mrml.volume_from_node(volume_node)
    label_map, _ = mrml.label_map_from_segments(segmentation, ["s1", "s2"], volume_node)
    plan = validation.plan_propagation(label_map, validation.PropagationSettings(slice_range=(2, 6)),
                                       volume_shape=volume.shape)
    run = runs.PropagationRun.prepare(volume, label_map, plan, [sys.executable, str(STAND_IN)], parent_folder=tmp_path)
    try:
        assert run.start().wait(timeout=60).state is jobs.JobState.SUCCEEDED
        masks = labels.split_label_map(run.read_result(), 2)
    finally:
        run.cleanup()
    mrml.set_segment_masks(segmentation, ["s1", "s2"], masks, volume_node)
    result = mrml.segment_masks(segmentation, ["s1", "s2"], volume_node)
    for k in range(9):
        inside = 2 <= k <= 6
        np.testing.assert_array_equal(result[0][k], kidney[4] if inside else 0)
        np.testing.assert_array_equal(result[1][k], cyst[4] if inside else 0)
    # The segmentation still sits on the volume's grid (no resampling crept in).
    assert np.allclose(mrml.node_ijk_to_ras(volume_node), geometry.ijk_to_ras())
