"""Scores of predicted masks against ground truth, computed with MONAI's metrics.

Conventions: masks are bool/int arrays of one structure (non-zero = foreground), the same shape as the ground
truth; spacing is given in the array's axis order (for a (K, J, I) volume: (k, j, i) spacing in mm).

HD95 when a mask is empty: MONAI returns nan/inf. :func:`hd95_mm` then returns the length of the volume's diagonal
in mm (the largest distance the field of view allows) and says so in its second value, so that a missed structure
is penalised rather than dropped; summaries report how many episodes were capped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, get_confusion_matrix


def _batch(mask: np.ndarray) -> torch.Tensor:
    """(...) mask -> (1, 1, ...) float tensor, the batch-first one-channel layout MONAI's metrics take."""
    return torch.from_numpy(np.ascontiguousarray(mask != 0, dtype=np.float32))[None, None]


def _tensor(result: object) -> torch.Tensor:
    """A MONAI metric's result: typed ``Tensor | Sequence`` by MONAI, a Tensor for the one batch tensor passed here."""
    return cast(torch.Tensor, result)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks of any dimension; 1.0 when both are empty (MONAI ``ignore_empty=False``)."""
    _check_shapes(prediction, truth)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return float(_tensor(metric(_batch(prediction), _batch(truth)))[0, 0])


def slice_dice(prediction: np.ndarray, truth: np.ndarray, axis: int) -> np.ndarray:
    """(N,) 2D Dice of every slice along ``axis`` of two 3D masks (1.0 where both slices are empty)."""
    _check_shapes(prediction, truth)
    pred = torch.from_numpy(np.ascontiguousarray(np.moveaxis(prediction != 0, axis, 0), dtype=np.float32))
    gt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(truth != 0, axis, 0), dtype=np.float32))
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return _tensor(metric(pred[:, None], gt[:, None]))[:, 0].numpy().astype(np.float64)


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a grid of ``shape`` voxels of ``spacing`` mm (same axis order)."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hd95_mm(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, bool]:
    """95th-percentile symmetric Hausdorff distance in mm, and whether it was capped.

    Returns ``(distance, capped)``: when the prediction or the truth is empty the distance is the grid's diagonal
    (:func:`diagonal_mm`) and ``capped`` is True; 0.0 when both are empty.
    """
    _check_shapes(prediction, truth)
    if len(spacing) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {prediction.ndim}D mask")
    has_pred, has_truth = bool(np.any(prediction)), bool(np.any(truth))
    if not has_pred and not has_truth:
        return 0.0, False
    if not has_pred or not has_truth:
        return diagonal_mm(prediction.shape, spacing), True
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(_tensor(metric(_batch(prediction), _batch(truth), spacing=[float(s) for s in spacing]))[0, 0])
    if not math.isfinite(value):
        return diagonal_mm(prediction.shape, spacing), True
    return value, False


def confusion_counts(prediction: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Foreground true/false positives and negatives (pixel counts) from MONAI's ``get_confusion_matrix``."""
    _check_shapes(prediction, truth)
    tp, fp, tn, fn = get_confusion_matrix(_batch(prediction), _batch(truth), include_background=True)[0, 0]
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def pooled_iou(records: Sequence[dict[str, int]]) -> dict[str, float]:
    """Pooled IoU over episodes of one class: sum of intersections / sum of unions, foreground and background.

    ``records``: confusion counts (:func:`confusion_counts`). Foreground IoU = sum tp / sum (tp + fp + fn);
    background IoU = sum tn / sum (tn + fp + fn). Also returns the summed intersections and unions, which FB-IoU
    pools across classes.
    """
    tp = sum(r["tp"] for r in records)
    fp = sum(r["fp"] for r in records)
    fn = sum(r["fn"] for r in records)
    tn = sum(r["tn"] for r in records)
    return {
        "iou": tp / (tp + fp + fn) if tp + fp + fn else float("nan"),
        "background_iou": tn / (tn + fp + fn) if tn + fp + fn else float("nan"),
        "fg_intersection": tp, "fg_union": tp + fp + fn, "bg_intersection": tn, "bg_union": tn + fp + fn,
    }


def structure_extent(truth: np.ndarray, axis: int) -> tuple[int, int] | None:
    """First and last slice index along ``axis`` where the 3D truth mask is non-empty (None if empty)."""
    other = tuple(a for a in range(truth.ndim) if a != axis)
    present = np.flatnonzero(np.any(truth, axis=other))
    if present.size == 0:
        return None
    return int(present[0]), int(present[-1])


def false_positive_slices(prediction: np.ndarray, truth: np.ndarray, axis: int) -> tuple[int, int]:
    """Slices beyond the truth's extent along ``axis``: (how many hold predicted foreground, how many there are)."""
    extent = structure_extent(truth, axis)
    other = tuple(a for a in range(prediction.ndim) if a != axis)
    predicted = np.any(prediction, axis=other)
    outside = np.ones(prediction.shape[axis], dtype=bool)
    if extent is not None:
        outside[extent[0] : extent[1] + 1] = False
    return int(np.count_nonzero(predicted & outside)), int(np.count_nonzero(outside))


def dice_by_distance(prediction: np.ndarray, truth: np.ndarray, axis: int,
                     labelled_index: int | Sequence[int]) -> dict[int, float]:
    """2D Dice of each slice inside the truth's extent, keyed by its distance (in slices) from the labelled slice
    (the nearest one when several are given).

    The labelled slices themselves (distance 0) are left out. Slices at the same distance are averaged.
    """
    extent = structure_extent(truth, axis)
    if extent is None:
        return {}
    labelled = np.atleast_1d(np.asarray(labelled_index, dtype=np.int64))
    per_slice = slice_dice(prediction, truth, axis)
    by_distance: dict[int, list[float]] = {}
    for index in range(extent[0], extent[1] + 1):
        distance = int(np.min(np.abs(labelled - index)))
        if distance:
            by_distance.setdefault(distance, []).append(float(per_slice[index]))
    return {d: float(np.mean(v)) for d, v in sorted(by_distance.items())}


def _check_shapes(prediction: np.ndarray, truth: np.ndarray) -> None:
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
