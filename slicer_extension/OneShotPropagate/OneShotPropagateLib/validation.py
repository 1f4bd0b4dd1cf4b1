"""Checks of what the user asked for, before anything is exported or run.

Every check raises :class:`ParameterError` (a ``ValueError``) with a sentence a clinician can act on; the Slicer
side shows it as is. Slice ranges are 0-based and inclusive at both ends, along an array axis of the (K, J, I)
volume (see :mod:`.slices`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .slices import AXIS_LETTERS, SliceSelectionError, choose_propagation_axis, describe_slices, labelled_slices

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
"""Device names offered in the user interface; ``cuda:N`` picks one GPU of several."""
PRECISION_CHOICES = ("auto", "fp32", "bf16")
IMAGE_SIZE_LIMITS = (112, 2048)
"""Smallest and largest side (pixels) each slice is resized to before feature extraction."""

_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


class ParameterError(ValueError):
    """A parameter the propagation cannot run with; the message says which and why."""


def validate_device(device: str) -> str:
    """``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (lower-cased, stripped)."""
    text = str(device).strip().lower()
    if text in DEVICE_CHOICES or _CUDA_INDEX.match(text):
        return text
    raise ParameterError(f"unknown device {device!r}: use one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def validate_precision(precision: str) -> str:
    """``"auto"`` (bf16 on a CPU with native bf16, else fp32), ``"fp32"`` or ``"bf16"``."""
    text = str(precision).strip().lower()
    if text not in PRECISION_CHOICES:
        raise ParameterError(f"unknown precision {precision!r}: use {' or '.join(PRECISION_CHOICES)}")
    return text


def validate_image_size(image_size: int) -> int:
    """Slice side in pixels fed to the backbone, within :data:`IMAGE_SIZE_LIMITS`."""
    low, high = IMAGE_SIZE_LIMITS
    if isinstance(image_size, bool) or int(image_size) != image_size or not low <= int(image_size) <= high:
        raise ParameterError(f"image size must be a whole number of pixels from {low} to {high}, got {image_size}")
    return int(image_size)


def validate_slice_range(shape: Sequence[int], axis: int, slice_range: Sequence[int] | None) -> tuple[int, int]:
    """The inclusive (first, last) slice range along ``axis`` of a (K, J, I) ``shape``; ``None`` means all slices."""
    if axis not in (0, 1, 2):
        raise ParameterError(f"array axis must be 0 (k), 1 (j) or 2 (i), got {axis}")
    count = int(shape[axis])
    if slice_range is None:
        return 0, count - 1
    if len(slice_range) != 2:
        raise ParameterError(f"a slice range is (first, last), got {tuple(slice_range)}")
    first, last = (int(v) for v in slice_range)
    letter = AXIS_LETTERS[axis]
    if first > last:
        raise ParameterError(
            f"slice range {first}-{last} along {letter} is reversed: the first slice comes after the last"
        )
    if first < 0 or last >= count:
        raise ParameterError(
            f"slice range {first}-{last} along {letter} lies outside the volume, which has slices 0-{count - 1}"
        )
    return first, last


def validate_segments(chosen: Sequence[str], available: Sequence[str]) -> list[str]:
    """The chosen segment IDs, in order, without duplicates; at least one, each present in ``available``."""
    picked = list(dict.fromkeys(str(s) for s in chosen))
    if not picked:
        raise ParameterError("no segment chosen: select at least one labelled segment to propagate")
    missing = [s for s in picked if s not in set(available)]
    if missing:
        raise ParameterError(f"segment(s) {', '.join(missing)} are not in the segmentation")
    return picked


@dataclass(frozen=True)
class PropagationSettings:
    """What the user chose. ``axis``: array axis or ``None`` (auto); ``slice_range``: inclusive, ``None`` = all;
    ``crop_ensemble``: the volume mode's ensemble of three crop scales (``commands.CROP_ENSEMBLE``);
    ``random_walk``: boundaries decided again in 3D on the grey values (the tool's default; off:
    ``commands.NO_RANDOM_WALK``)."""

    axis: int | None = None
    slice_range: tuple[int, int] | None = None
    device: str = "auto"
    precision: str = "auto"
    image_size: int = 448
    weights: str | None = None
    crop_ensemble: bool = False
    random_walk: bool = True

    def validated(self) -> PropagationSettings:
        """A copy with device, precision and image size checked and normalised (axis and range need a volume)."""
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise ParameterError(f"array axis must be 0 (k), 1 (j), 2 (i) or automatic, got {self.axis}")
        weights = str(self.weights).strip() if self.weights else None
        return replace(
            self,
            device=validate_device(self.device),
            precision=validate_precision(self.precision),
            image_size=validate_image_size(self.image_size),
            weights=weights or None,
        )


@dataclass(frozen=True)
class PropagationPlan:
    """A checked propagation: array ``axis``, inclusive ``slice_range``, ``labelled`` slices inside it."""

    axis: int
    slice_range: tuple[int, int]
    labelled: tuple[int, ...]
    settings: PropagationSettings

    @property
    def slices_to_segment(self) -> int:
        """Number of unlabelled slices in the range, i.e. those the model segments."""
        first, last = self.slice_range
        return last - first + 1 - len(self.labelled)


def _check_label_map(label_map: np.ndarray, volume_shape: Sequence[int] | None) -> np.ndarray:
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ParameterError(f"the labels must form a (K, J, I) volume, got shape {labels.shape}")
    if volume_shape is not None and tuple(labels.shape) != tuple(int(s) for s in volume_shape[:3]):
        raise ParameterError(
            f"the labels' grid {tuple(labels.shape)} differs from the volume's {tuple(volume_shape[:3])}"
        )
    return labels


def plan_propagation(
    label_map: np.ndarray, settings: PropagationSettings, *, volume_shape: Sequence[int] | None = None
) -> PropagationPlan:
    """Check a propagation through one volume and resolve the automatic axis.

    ``label_map``: (K, J, I) labels of the chosen segments (0 = background) on the volume's grid. Requires at
    least one labelled slice inside the range and at least one unlabelled slice to segment.
    """
    checked = settings.validated()
    labels = _check_label_map(label_map, volume_shape)
    try:
        axis = checked.axis if checked.axis is not None else choose_propagation_axis(labels)
    except SliceSelectionError as error:
        raise ParameterError(f"nothing to propagate: {error}") from error
    first, last = validate_slice_range(labels.shape, axis, checked.slice_range)
    every = labelled_slices(labels, axis)
    inside = tuple(i for i in every if first <= i <= last)
    letter = AXIS_LETTERS[axis]
    if not every:
        raise ParameterError("nothing to propagate: the chosen segments are empty; label at least one slice first")
    if not inside:
        raise ParameterError(
            f"no labelled slice inside the range {first}-{last} along {letter}; "
            f"labelled slices are {describe_slices(every)}"
        )
    if len(inside) == last - first + 1:
        raise ParameterError(f"every slice of the range {first}-{last} along {letter} is already labelled")
    return PropagationPlan(axis=axis, slice_range=(first, last), labelled=inside, settings=checked)


def plan_transfer(
    label_map: np.ndarray,
    settings: PropagationSettings,
    target_names: Sequence[str],
    *,
    volume_shape: Sequence[int] | None = None,
) -> PropagationPlan:
    """Check a transfer of the reference's labels to other studies (``target_names``: at least one).

    The range does not apply to the targets (each is segmented whole); the reference needs a labelled slice.
    """
    if not target_names:
        raise ParameterError("no target study chosen: tick at least one other volume to transfer the labels to")
    if len(set(target_names)) != len(target_names):
        raise ParameterError("a target study is listed twice")
    checked = replace(settings, slice_range=None).validated()
    labels = _check_label_map(label_map, volume_shape)
    try:
        axis = checked.axis if checked.axis is not None else choose_propagation_axis(labels)
    except SliceSelectionError as error:
        raise ParameterError(f"nothing to transfer: {error}") from error
    labelled = tuple(labelled_slices(labels, axis))
    if not labelled:
        raise ParameterError("nothing to transfer: the chosen segments are empty in the reference volume")
    return PropagationPlan(axis=axis, slice_range=(0, int(labels.shape[axis]) - 1), labelled=labelled, settings=checked)
