"""Which slices of a label map are labelled, and which array axis to propagate along.

Array axes follow the (K, J, I) layout: axis 0 is k (slices), 1 is j (rows), 2 is i (columns). The letters
``k``, ``j`` and ``i`` are what the ``insid3-med`` command line takes for ``--axis``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

AXIS_LETTERS = ("k", "j", "i")
"""Letter of each array axis: ``AXIS_LETTERS[axis]``."""

_PLANE_OF_RAS_AXIS = ("sagittal", "coronal", "axial")  # plane whose normal is R, A, S


class SliceSelectionError(ValueError):
    """A label map or axis that does not allow propagation (no labels, unknown axis...)."""


def parse_axis(value: str | int | None) -> int | None:
    """Array axis 0, 1 or 2 from ``"k"``, ``"j"``, ``"i"`` or an int; ``None`` for ``"auto"`` or ``None``."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) in (0, 1, 2):
            return int(value)
        raise SliceSelectionError(f"array axis must be 0 (k), 1 (j) or 2 (i), got {value}")
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text in AXIS_LETTERS:
        return AXIS_LETTERS.index(text)
    raise SliceSelectionError(f"unknown axis {value!r}: use 'auto', 'k', 'j' or 'i'")


def labelled_slices(label_map: np.ndarray, axis: int) -> list[int]:
    """Indices along array ``axis`` of the slices of a (K, J, I) label map that hold any non-zero label."""
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise SliceSelectionError(f"expected a (K, J, I) label map, got shape {labels.shape}")
    if axis not in (0, 1, 2):
        raise SliceSelectionError(f"array axis must be 0, 1 or 2, got {axis}")
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.flatnonzero(np.any(labels != 0, axis=other))]


def choose_propagation_axis(label_map: np.ndarray) -> int:
    """The array axis along which the fewest slices are labelled (ties go to k, then j).

    A user who labelled one axial slice of an axial series gets k; one who labelled a sagittal slice gets i.
    Raises :class:`SliceSelectionError` when nothing is labelled.
    """
    counts = [len(labelled_slices(label_map, axis)) for axis in range(3)]
    if counts[0] == 0:
        raise SliceSelectionError("the label map is empty: label at least one slice first")
    return int(np.argmin(counts))


def array_axis_for_normal(ijk_to_ras: np.ndarray, normal_ras: Sequence[float]) -> int:
    """The array axis (0 = k, 1 = j, 2 = i) most parallel to a slice view's normal given in RAS.

    ``ijk_to_ras``: the volume's (4, 4) IJKToRAS matrix (column c = RAS direction of voxel axis c = i, j, k).
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    normal = np.asarray(normal_ras, dtype=np.float64)
    if not np.any(normal):
        raise SliceSelectionError("slice view normal is the zero vector")
    directions = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    cosines = np.abs(directions.T @ (normal / np.linalg.norm(normal)))
    voxel_axis = int(np.argmax(cosines))  # 0 = i, 1 = j, 2 = k
    return 2 - voxel_axis


def anatomical_plane(ijk_to_ras: np.ndarray, axis: int) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"``: the plane of the slices across array ``axis``."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    direction = matrix[:, 2 - axis]
    return _PLANE_OF_RAS_AXIS[int(np.argmax(np.abs(direction)))]


def describe_slices(indices: Iterable[int]) -> str:
    """Compact text of slice indices, runs joined: ``[3, 4, 5, 9] -> "3-5, 9"``; ``"none"`` when empty."""
    values = sorted({int(i) for i in indices})
    if not values:
        return "none"
    runs: list[str] = []
    start = previous = values[0]
    for value in values[1:] + [None]:  # type: ignore[list-item]
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return ", ".join(runs)
