"""Geometry carried with every volume from reader to writer.

Conventions (the same as SimpleITK, ITK, DICOM and 3D Slicer):

- ``Volume.array`` is indexed ``(k, j, i)`` = (slice, row, column), exactly what ``SimpleITK.GetArrayFromImage``
  and Slicer's ``arrayFromVolume`` return.
- ``Geometry.spacing`` and ``Geometry.origin`` are in (i, j, k) order, in millimetres; the physical frame is LPS.
- ``Geometry.direction`` is the 3x3 matrix whose column ``c`` is the LPS direction of voxel axis ``c`` (i, j, k).

NIfTI/nibabel and MONAI use RAS: :meth:`Geometry.ijk_to_ras` gives the affine they expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat, SupportsInt, cast

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Float3 = tuple[float, float, float]


def float_triple(values: Iterable[SupportsFloat]) -> Float3:
    """``tuple(float(v) for v in values)``, typed as the (x, y, z) triple of a spacing, origin or direction row
    (the caller passes three values; the length is not checked)."""
    return cast(Float3, tuple(float(v) for v in values))


def direction_rows(rows: Iterable[Iterable[SupportsFloat]]) -> tuple[Float3, ...]:
    """A 3x3 matrix (rows of three numbers) as the nested float tuple of :attr:`Geometry.direction`."""
    return tuple(float_triple(row) for row in rows)


def int_triple(values: Iterable[SupportsInt]) -> tuple[int, int, int]:
    """``tuple(int(v) for v in values)``, typed as a (K, J, I) shape (the caller passes three values)."""
    return cast(tuple[int, int, int], tuple(int(v) for v in values))


@dataclass(frozen=True)
class Geometry:
    """Voxel grid placement: spacing (mm, i-j-k order), origin (mm, LPS) and direction cosines (LPS)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64; column c is the LPS direction of voxel axis c (i, j, k)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def slice_plane(self, axis: int) -> str:
        """"axial", "coronal" or "sagittal": the patient-space plane nearest to the slices across array ``axis``
        (0, 1 or 2 of a (K, J, I) array), from the direction of voxel axis 2 - ``axis``."""
        component = int(np.argmax(np.abs(self.direction_matrix()[:, 2 - axis])))  # 0: L, 1: P, 2: S
        return ("sagittal", "coronal", "axial")[component]

    def ijk_to_lps(self) -> np.ndarray:
        """(4, 4) affine mapping homogeneous (i, j, k, 1) voxel indices to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix() * np.asarray(self.spacing, dtype=np.float64)[None, :]
        affine[:3, 3] = np.asarray(self.origin, dtype=np.float64)
        return affine

    def ijk_to_ras(self) -> np.ndarray:
        """(4, 4) affine mapping (i, j, k, 1) to RAS millimetres, as NIfTI, nibabel and MONAI use."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_lps(cls, affine: np.ndarray) -> Geometry:
        """Inverse of :meth:`ijk_to_lps` for an affine without shear."""
        affine = np.asarray(affine, dtype=np.float64)
        linear = affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"degenerate affine (zero spacing): {affine.tolist()}")
        direction = linear / spacing[None, :]
        return cls(
            spacing=float_triple(spacing),
            origin=float_triple(affine[:3, 3]),
            direction=direction_rows(direction),
        )

    @classmethod
    def from_ijk_to_ras(cls, affine: np.ndarray) -> Geometry:
        """Inverse of :meth:`ijk_to_ras` (for example a nibabel affine)."""
        return cls.from_ijk_to_lps(LPS_TO_RAS @ np.asarray(affine, dtype=np.float64))

    def allclose(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when both affines agree entry by entry (to ``atol`` mm / cosine units)."""
        return bool(np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=atol))

    def max_distance(self, other: Geometry, shape: tuple[int, ...]) -> float:
        """The largest distance (mm) between the points where the two grids place one voxel of a (K, J, I) array of
        ``shape`` (reached at a corner of the array: both maps are affine)."""
        k, j, i = (max(int(n) - 1, 0) for n in shape[:3])
        corners = np.array([[a, b, c, 1.0] for a in (0, i) for b in (0, j) for c in (0, k)]).T  # (4, 8) i, j, k
        return float(np.linalg.norm((self.ijk_to_lps() - other.ijk_to_lps()) @ corners, axis=0).max())



class OutsideGridError(ValueError):
    """Labelled voxels of an array lie outside the grid it is placed on (:func:`place_on_grid`)."""


def place_on_grid(array: np.ndarray, geometry: Geometry, target: Geometry, shape: tuple[int, int, int],
                  atol: float = 1e-3) -> np.ndarray | None:
    """``array`` (K, J, I) on ``geometry``, re-indexed voxel for voxel onto ``target``'s (K, J, I) grid of ``shape``.

    This is for grids that share one voxel lattice, such as a segmentation saved cropped to its structure (older
    3D Slicer versions), a DICOM SEG holding only its labelled frames, or a label map whose axes are stored in
    another order or reversed: each voxel axis of ``geometry`` must be a voxel axis of ``target``, possibly
    reversed, with the same spacing, and its origin must lie on a voxel of ``target`` (all to ``atol`` mm). Nothing
    is interpolated.
    Returns None when the lattices differ. Voxels of ``target`` that ``array`` does not cover are 0; non-zero voxels
    of ``array`` outside ``target``'s extent raise :class:`OutsideGridError`.
    """
    source_axes = geometry.ijk_to_lps()[:3, :3]
    target_axes = target.ijk_to_lps()[:3, :3]
    steps = np.linalg.solve(target_axes, source_axes)  # column c: source axis c in target (i, j, k) voxel steps
    signed = np.round(steps)
    spacing = np.asarray(target.spacing, dtype=np.float64)
    if not np.allclose((steps - signed) * spacing[:, None], 0.0, atol=atol):
        return None
    magnitude = np.abs(signed)
    if not (np.all(magnitude.sum(axis=0) == 1) and np.all(magnitude.sum(axis=1) == 1)):
        return None
    offset = np.linalg.solve(target_axes, np.asarray(geometry.origin, dtype=np.float64)
                             - np.asarray(target.origin, dtype=np.float64))
    start = np.round(offset)
    if not np.allclose((offset - start) * spacing, 0.0, atol=atol):
        return None
    source_axis = [int(np.flatnonzero(signed[a])[0]) for a in range(3)]  # target axis a (i, j, k) <- source axis
    source_size = array.shape[:3][::-1]  # (I, J, K)
    moved = np.transpose(array, [2 - source_axis[a] for a in (2, 1, 0)])  # axes now follow the target's (k, j, i)
    first = np.zeros(3, dtype=np.int64)  # target index (i, j, k) of moved[0, 0, 0]
    for a, c in enumerate(source_axis):
        if signed[a, c] < 0:
            moved = np.flip(moved, axis=2 - a)
            first[a] = int(start[a]) - (source_size[c] - 1)
        else:
            first[a] = int(start[a])
    placed = np.zeros(shape, dtype=array.dtype)
    source_box, target_box = [], []
    for axis in range(3):  # array axis (k, j, i) is target axis 2 - axis
        low = int(first[2 - axis])
        begin, end = max(low, 0), min(low + moved.shape[axis], shape[axis])
        end = max(end, begin)
        target_box.append(slice(begin, end))
        source_box.append(slice(begin - low, end - low))
    kept = moved[tuple(source_box)]
    outside = int(np.count_nonzero(moved)) - int(np.count_nonzero(kept))
    if outside:
        raise OutsideGridError(f"{outside} labelled voxels lie outside the image's extent")
    placed[tuple(target_box)] = kept
    return placed

@dataclass
class Volume:
    """A 3D image (or a 2D image as one slice) with its geometry and what is known of its origin.

    ``array``: (K, J, I) for grey values; (K, J, I, 3) for RGB. ``modality``: DICOM modality code when known
    ("CT", "MR", "CR", "DX", "XC" for photographs, "OT" otherwise). ``metadata``: reader-specific facts (for example
    the DICOM window, photometric interpretation, SeriesInstanceUID, and the source DICOM file paths in slice order
    that a DICOM SEG writer needs).
    """

    array: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    modality: str | None = None
    source: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(K, J, I) spatial shape."""
        return int_triple(self.array.shape[:3])

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4 and self.array.shape[-1] == 3

    def in_plane_spacing(self, axis: int) -> tuple[float, float]:
        """(row, column) pixel spacing in mm of the slices across array ``axis`` (0, 1 or 2 of (K, J, I))."""
        spacing_kji = [float(s) for s in self.geometry.spacing][::-1]
        rows, cols = (spacing_kji[a] for a in range(3) if a != axis)
        return rows, cols
