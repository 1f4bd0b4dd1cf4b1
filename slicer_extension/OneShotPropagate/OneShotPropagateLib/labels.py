"""Label arrays: segment masks <-> one label map, and sub-extents of segment editor images.

Plain numpy (no Slicer, no ``insid3_med``), so the module can show which slices are labelled before its Python
dependencies are installed. Arrays are (K, J, I); VTK extents are (i0, i1, j0, j1, k0, k1), inclusive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class LabelArrayError(ValueError):
    """Masks or extents that do not fit together (shapes differ, too many labels...)."""


def extent_shape(extent: Sequence[int]) -> tuple[int, int, int]:
    """(K, J, I) array shape of a VTK extent (i0, i1, j0, j1, k0, k1); an empty extent gives zeros."""
    if len(extent) != 6:
        raise LabelArrayError(f"a VTK extent has 6 values (i0, i1, j0, j1, k0, k1), got {list(extent)}")
    i0, i1, j0, j1, k0, k1 = (int(v) for v in extent)
    return max(k1 - k0 + 1, 0), max(j1 - j0 + 1, 0), max(i1 - i0 + 1, 0)


def paste_into_extent(sub_array: np.ndarray, sub_extent: Sequence[int], full_extent: Sequence[int]) -> np.ndarray:
    """``sub_array`` (K, J, I) placed at ``sub_extent`` inside a zero array covering ``full_extent``.

    Both extents are on the same voxel grid; voxels of ``sub_array`` outside ``full_extent`` are dropped.
    Returns an array of shape ``extent_shape(full_extent)`` and ``sub_array``'s dtype.
    """
    if tuple(sub_array.shape[:3]) != extent_shape(sub_extent):
        raise LabelArrayError(
            f"array shape {tuple(sub_array.shape)} does not match its extent {list(sub_extent)} "
            f"(expected (K, J, I) = {extent_shape(sub_extent)})"
        )
    full = np.zeros(extent_shape(full_extent) + tuple(sub_array.shape[3:]), dtype=sub_array.dtype)
    target, source = [], []
    # Array axes are (k, j, i); extent pairs are (i, j, k).
    for pair in (2, 1, 0):
        low = max(int(sub_extent[2 * pair]), int(full_extent[2 * pair]))
        high = min(int(sub_extent[2 * pair + 1]), int(full_extent[2 * pair + 1]))
        if high < low:
            return full
        target.append(slice(low - int(full_extent[2 * pair]), high - int(full_extent[2 * pair]) + 1))
        source.append(slice(low - int(sub_extent[2 * pair]), high - int(sub_extent[2 * pair]) + 1))
    full[tuple(target)] = sub_array[tuple(source)]
    return full


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned type for labels 0..max_label (uint8 or uint16)."""
    if max_label < 0 or max_label > 65535:
        raise LabelArrayError(f"label value {max_label} does not fit a label map (0..65535)")
    return np.dtype(np.uint8 if max_label <= 255 else np.uint16)


def merge_segment_masks(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """One (K, J, I) label map from binary segment masks: segment n (0-based) gets label n + 1.

    Where segments overlap the first one in ``masks`` wins (as the top row of Slicer's segment table does).
    Returns ``(label_map, overlapping_voxels)``; label_map is uint8 (uint16 beyond 255 segments).
    """
    if len(masks) == 0:
        raise LabelArrayError("no segment masks to merge")
    shape = tuple(masks[0].shape)
    if len(shape) != 3:
        raise LabelArrayError(f"segment masks must be (K, J, I) arrays, got shape {shape}")
    label_map = np.zeros(shape, dtype=label_dtype(len(masks)))
    covered = np.zeros(shape, dtype=bool)
    overlapping = 0
    for index, mask in enumerate(masks):
        if tuple(mask.shape) != shape:
            raise LabelArrayError(f"segment mask {index} has shape {tuple(mask.shape)}, the first has {shape}")
        inside = np.asarray(mask) > 0
        overlapping += int(np.count_nonzero(inside & covered))
        label_map[inside & ~covered] = index + 1
        covered |= inside
    return label_map, overlapping


def split_label_map(label_map: np.ndarray, count: int) -> list[np.ndarray]:
    """Binary uint8 masks (K, J, I) of labels 1..count, in order (label n + 1 -> mask n)."""
    if count < 1:
        raise LabelArrayError(f"number of segments must be at least 1, got {count}")
    labels = np.asarray(label_map)
    return [(labels == value).astype(np.uint8) for value in range(1, count + 1)]
