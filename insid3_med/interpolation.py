"""Shape-based interpolation between labelled slices: what a "fill between slices" tool does.

Between two slices that hold a structure, each slice takes the structure where the linear blend of the two slices'
signed distance maps is negative. The volume mode adds it between a structure's labelled slices
(``PropagationParams.fill_between_labelled``); the evaluation harness scores it alone as a baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def signed_distance_mm(mask: np.ndarray, spacing_rows_cols: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """(H, W) bool mask -> (H, W) float64 signed distance in mm: negative inside (minus the distance to the nearest
    outside pixel), positive outside (the distance to the nearest inside pixel); +inf everywhere when empty."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, np.inf)
    spacing = tuple(float(s) for s in spacing_rows_cols)
    return distance_transform_edt(~mask, sampling=spacing) - distance_transform_edt(mask, sampling=spacing)


def interpolate_between_slices(labels: np.ndarray, axis: int,
                               spacing_rows_cols: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Shape-based interpolation between labelled slices: between two slices that hold a structure, each slice
    takes the structure where the linear blend of the two slices' signed distances (:func:`signed_distance_mm`) is
    negative; nothing beyond its first and last labelled slice. A voxel several structures claim goes to the one it
    lies deepest in; the slices a structure is drawn on keep it as drawn. labels: (K, J, I); same shape and dtype."""
    moved = np.moveaxis(np.asarray(labels), axis, 0)
    output = moved.copy()
    depth = np.full(moved.shape, np.inf)
    for value in (int(v) for v in np.unique(moved) if v != 0):
        slices = [n for n in range(moved.shape[0]) if np.any(moved[n] == value)]
        distances = {n: signed_distance_mm(moved[n] == value, spacing_rows_cols) for n in slices}
        for below, above in zip(slices[:-1], slices[1:], strict=True):
            for n in range(below + 1, above):
                weight = (n - below) / (above - below)
                blend = (1.0 - weight) * distances[below] + weight * distances[above]
                take = (blend < 0) & (blend < depth[n]) & (moved[n] == 0)  # drawn voxels stay as drawn
                output[n][take] = value
                depth[n][take] = blend[take]
    return np.moveaxis(output, 0, axis)
