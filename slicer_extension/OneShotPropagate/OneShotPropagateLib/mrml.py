"""The thin MRML adapter: volume and segmentation nodes <-> numpy arrays and ``insid3_med`` volumes.

Needs ``vtk`` and ``slicer`` as found inside 3D Slicer, or as PyPI ``slicer-core`` provides them (a Qt-free MRML
core): it uses only node methods and the static ``vtkSlicerSegmentationsModuleLogic`` functions, never
``slicer.mrmlScene``, ``slicer.app`` or ``slicer.modules``, so the same code runs in Slicer and in CI tests on a
real ``vtkMRMLScene``. Every node it creates lives in the scene of the node it was given. Functions that deal in
``insid3_med`` volumes import it when called; the others work before the module's dependencies are installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .labels import LabelArrayError, merge_segment_masks

if TYPE_CHECKING:
    from insid3_med.imaging.geometry import Volume

TEMPORARY_NODE_NAME = "__OneShotPropagate_temporary__"


class MRMLAdapterError(LabelArrayError):
    """A node that cannot be read or written as asked (no voxel data, unknown segment...)."""


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """(4, 4) float64 copy of a ``vtkMatrix4x4``."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A ``vtkMatrix4x4`` holding a (4, 4) array."""
    values = np.asarray(array, dtype=np.float64)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(values[r, c]))
    return matrix


def node_ijk_to_ras(volume_node) -> np.ndarray:
    """The (4, 4) IJKToRAS matrix of a volume node (its own frame; parent transforms are not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def array_from_image_data(image_data: vtk.vtkImageData) -> np.ndarray:
    """(K, J, I) copy of a one-component ``vtkImageData`` (``(K, J, I, C)`` for C components)."""
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise MRMLAdapterError("the image has no voxel data")
    dims = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return np.array(flat.reshape(shape), copy=True)


def volume_from_node(volume_node) -> Volume:
    """A :class:`Volume` copy of a scalar volume node (array (K, J, I), geometry from its IJKToRAS)."""
    from .conversion import volume_from_slicer

    if volume_node is None:
        raise MRMLAdapterError("no volume selected")
    image = volume_node.GetImageData()
    if image is None:
        raise MRMLAdapterError(f"volume {volume_node.GetName()!r} has no voxel data")
    return volume_from_slicer(array_from_image_data(image), node_ijk_to_ras(volume_node), name=volume_node.GetName())


def add_volume_node(scene, volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` holding ``volume`` (grey (K, J, I)); used for results and tests."""
    from .conversion import ijk_to_ras_from_geometry

    array = np.ascontiguousarray(volume.array)
    if array.ndim != 3:
        raise MRMLAdapterError(f"volume {name!r}: only grey (K, J, I) volumes can be added, got {array.shape}")
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(array_to_matrix(ijk_to_ras_from_geometry(volume.geometry)))
    return node


def segment_ids(segmentation_node) -> list[str]:
    """IDs of all segments, in the order of the segment table."""
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def segment_names(segmentation_node, ids: Sequence[str]) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(segment_id).GetName() for segment_id in ids]


def segment_masks(segmentation_node, ids: Sequence[str], reference_volume_node) -> list[np.ndarray]:
    """Binary uint8 masks (K, J, I) of the given segments on the reference volume's voxel grid.

    Exports each segment through a temporary label map node; that node, its display node and the colour table
    made for it are removed again.
    """
    scene = segmentation_node.GetScene()
    known = set(segment_ids(segmentation_node))
    masks = []
    for segment_id in ids:
        if segment_id not in known:
            raise MRMLAdapterError(f"segment {segment_id!r} is not in {segmentation_node.GetName()!r}")
        colour_tables_before = _node_ids(scene, "vtkMRMLColorTableNode")
        labelmap = scene.CreateNodeByClass("vtkMRMLLabelMapVolumeNode")
        labelmap.UnRegister(None)  # CreateNodeByClass hands over a reference; Python keeps its own
        labelmap.SetName(TEMPORARY_NODE_NAME)
        labelmap.SetHideFromEditors(True)  # node selectors and the Data module do not list it
        scene.AddNode(labelmap)
        try:
            exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node,
                [segment_id],
                labelmap,
                reference_volume_node,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            )
            if not exported:
                raise MRMLAdapterError(f"segment {segment_id!r} could not be exported to a label map")
            masks.append((array_from_image_data(labelmap.GetImageData()) > 0).astype(np.uint8))
        finally:
            display = labelmap.GetDisplayNode()
            if display is not None:
                scene.RemoveNode(display)
            scene.RemoveNode(labelmap)
            for node_id in _node_ids(scene, "vtkMRMLColorTableNode") - colour_tables_before:
                scene.RemoveNode(scene.GetNodeByID(node_id))
    return masks


def _node_ids(scene, class_name: str) -> set[str]:
    nodes = scene.GetNodesByClass(class_name)
    ids = {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}
    nodes.UnRegister(None)  # GetNodesByClass hands over a new collection (as slicer.util.getNodesByClass does)
    return ids


def label_map_from_segments(
    segmentation_node, ids: Sequence[str], reference_volume_node
) -> tuple[np.ndarray, int]:
    """(K, J, I) label map of the segments (segment n -> label n + 1) and the number of overlapping voxels."""
    return merge_segment_masks(segment_masks(segmentation_node, ids, reference_volume_node))


def oriented_image_to_array(image) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int, int, int]]:
    """(K, J, I) copy of a ``vtkOrientedImageData``, its (4, 4) image-to-world matrix and its extent."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    extent = tuple(int(v) for v in image.GetExtent())
    return array_from_image_data(image), matrix_to_array(matrix), extent  # type: ignore[return-value]


def array_to_oriented_image(
    array: np.ndarray, image_to_world: np.ndarray, extent: Sequence[int] | None = None, output=None
):
    """Fill ``output`` (or a new ``vtkOrientedImageData``) with a (K, J, I) array at ``extent`` (default 0-based)."""
    from .conversion import check_ijk_to_ras

    values = np.ascontiguousarray(array)
    if values.ndim != 3:
        raise MRMLAdapterError(f"expected a (K, J, I) array, got shape {values.shape}")
    if extent is None:
        extent = (0, values.shape[2] - 1, 0, values.shape[1] - 1, 0, values.shape[0] - 1)
    expected = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if tuple(values.shape) != tuple(expected):
        raise MRMLAdapterError(f"array shape {values.shape} does not match extent {list(extent)}")
    image = output if output is not None else slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.ravel(), deep=True))
    image.SetImageToWorldMatrix(array_to_matrix(check_ijk_to_ras(image_to_world, "image-to-world matrix")))
    return image


def set_segment_masks(
    segmentation_node, ids: Sequence[str], masks: Sequence[np.ndarray], reference_volume_node
) -> None:
    """Replace each segment's content by its (K, J, I) mask given on the reference volume's grid."""
    if len(ids) != len(masks):
        raise MRMLAdapterError(f"{len(ids)} segments but {len(masks)} masks")
    ijk_to_ras = node_ijk_to_ras(reference_volume_node)
    known = set(segment_ids(segmentation_node))
    for segment_id, mask in zip(ids, masks, strict=True):
        if segment_id not in known:
            raise MRMLAdapterError(f"segment {segment_id!r} is not in {segmentation_node.GetName()!r}")
        image = array_to_oriented_image((np.asarray(mask) > 0).astype(np.uint8), ijk_to_ras)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        ):
            raise MRMLAdapterError(f"segment {segment_id!r} of {segmentation_node.GetName()!r} could not be updated")


def new_segmentation_like(template_node, ids: Sequence[str], reference_volume_node, name: str):
    """A new segmentation node (in the reference volume's scene) with empty segments named and coloured like
    ``ids`` of ``template_node``, on the reference volume's geometry. Segment IDs are kept."""
    scene = reference_volume_node.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    template = template_node.GetSegmentation()
    for segment_id in ids:
        source = template.GetSegment(segment_id)
        if source is None:
            raise MRMLAdapterError(f"segment {segment_id!r} is not in {template_node.GetName()!r}")
        node.GetSegmentation().AddEmptySegment(segment_id, source.GetName(), source.GetColor())
    return node
