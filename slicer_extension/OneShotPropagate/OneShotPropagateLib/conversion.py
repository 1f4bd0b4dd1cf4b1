"""Slicer's voxel arrays and matrices <-> the ``insid3_med`` ``Volume`` / ``Geometry`` types.

Slicer hands out a volume as a (K, J, I) array (``slicer.util.arrayFromVolume``) and a 4x4 IJKToRAS matrix that
maps homogeneous (i, j, k, 1) voxel indices to RAS millimetres. ``insid3_med`` keeps the same (K, J, I) array but
stores the grid in LPS (spacing and origin in (i, j, k) order, direction columns per voxel axis), so the only
change of frame is the sign of the first two world axes: RAS = diag(-1, -1, 1) LPS.

Segment editor images (``vtkOrientedImageData``) may start at a non-zero extent (i0, i1, j0, j1, k0, k1): their
image-to-world matrix maps *extent* indices, so an array cut from it needs that matrix shifted by (i0, j0, k0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from insid3_med.imaging.geometry import Geometry, Volume


class ConversionError(ValueError):
    """An array or matrix from Slicer that cannot be turned into a volume (wrong shape, degenerate matrix...)."""


def check_ijk_to_ras(
    ijk_to_ras: np.ndarray | Sequence[Sequence[float]], what: str = "IJKToRAS matrix"
) -> np.ndarray:
    """The matrix as a (4, 4) float64 array; raises :class:`ConversionError` if it is not an invertible affine."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ConversionError(f"{what}: expected a 4x4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ConversionError(f"{what}: holds NaN or infinite values")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ConversionError(f"{what}: last row is {matrix[3].tolist()}, not [0, 0, 0, 1]")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ConversionError(f"{what}: singular (a voxel axis has zero length or two axes coincide)")
    return matrix


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray | Sequence[Sequence[float]]) -> Geometry:
    """The LPS :class:`Geometry` of a grid given by Slicer's (4, 4) IJKToRAS matrix."""
    return Geometry.from_ijk_to_ras(check_ijk_to_ras(ijk_to_ras))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """Slicer's (4, 4) IJKToRAS matrix of a :class:`Geometry` (what ``vtkMRMLVolumeNode.SetIJKToRASMatrix`` takes)."""
    return geometry.ijk_to_ras()


def volume_from_slicer(
    array: np.ndarray,
    ijk_to_ras: np.ndarray | Sequence[Sequence[float]],
    *,
    modality: str | None = None,
    name: str | None = None,
) -> Volume:
    """A :class:`Volume` holding a copy of a Slicer voxel array.

    ``array``: (K, J, I) scalars or (K, J, I, 3) RGB, as ``arrayFromVolume`` returns (a view into VTK memory, so
    it is copied). ``ijk_to_ras``: the node's (4, 4) IJKToRAS matrix. ``name`` (the node name) goes to
    ``metadata["slicer_node_name"]``.
    """
    label = f"volume {name!r}" if name else "volume"
    data = np.array(array, copy=True)
    is_rgb = data.ndim == 4 and data.shape[-1] == 3
    if data.ndim != 3 and not is_rgb:
        raise ConversionError(f"{label}: expected a (K, J, I) or (K, J, I, 3) array, got shape {data.shape}")
    if min(data.shape[:3]) < 1:
        raise ConversionError(f"{label}: empty array of shape {data.shape}")
    metadata = {"slicer_node_name": name} if name else {}
    return Volume(array=data, geometry=geometry_from_ijk_to_ras(ijk_to_ras), modality=modality, metadata=metadata)


def slicer_from_volume(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The (K, J, I[, 3]) array and (4, 4) IJKToRAS matrix that put ``volume`` into a Slicer volume node."""
    return np.ascontiguousarray(volume.array), ijk_to_ras_from_geometry(volume.geometry)


def ijk_to_ras_for_extent(image_to_world: np.ndarray, extent: Sequence[int]) -> np.ndarray:
    """IJKToRAS of the array cut from an oriented image at ``extent``: array index (0, 0, 0) is (i0, j0, k0)."""
    matrix = check_ijk_to_ras(image_to_world, "image-to-world matrix")
    shift = np.eye(4)
    shift[:3, 3] = [float(extent[0]), float(extent[2]), float(extent[4])]
    return matrix @ shift
