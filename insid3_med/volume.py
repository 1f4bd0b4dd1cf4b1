"""Slice-wise processing of volumes: propagation through the slices of a study and transfer to other studies.

Volumes are :class:`~insid3_med.imaging.geometry.Volume` objects, (K, J, I) arrays. A slicing ``axis`` is an array
axis (0 = K, 1 = J, 2 = I); :func:`slicing_axis` also accepts "axial", "coronal", "sagittal" (patient space).
Slices are streamed: each is normalised, resampled to square pixels, encoded once, segmented and released, so memory
does not grow with the number of slices. Outputs are (K, J, I) int label maps on the input grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from insid3_med.imaging.geometry import Volume
from insid3_med.imaging.intensity import IntensityMapping, intensity_mapping
from insid3_med.predictor import EncodedImage, OneShotSegmenter

ProgressCallback = Callable[[int, int], None]

ARRAY_AXIS_NAMES = {"k": 0, "j": 1, "i": 2}
PATIENT_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # LPS component of the slice normal


class NoLabelledSliceError(ValueError):
    """The label volume holds no labelled voxel (inside the requested range)."""


class LabelGridError(ValueError):
    """The label volume is not on the image's grid."""


def slicing_axis(volume: Volume, axis: int | str) -> int:
    """The array axis (0, 1 or 2) to slice along: an int, "k"/"j"/"i", or "axial"/"coronal"/"sagittal"."""
    if isinstance(axis, int) or (isinstance(axis, str) and axis.isdigit()):
        value = int(axis)
        if value not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, not {value}")
        return value
    name = str(axis).lower()
    if name in ARRAY_AXIS_NAMES:
        return ARRAY_AXIS_NAMES[name]
    if name in PATIENT_AXES:
        direction = volume.geometry.direction_matrix()  # column c: LPS direction of voxel axis c (i, j, k)
        voxel_axis = int(np.argmax(np.abs(direction[PATIENT_AXES[name], :])))
        return 2 - voxel_axis
    raise ValueError(f"unknown axis {axis!r}: use 0/1/2, k/j/i or axial/coronal/sagittal")


def through_plane_axis(volume: Volume) -> int:
    """The array axis with the coarsest spacing (ties: the one with fewest voxels): the acquisition's slice axis."""
    spacing = np.asarray(volume.geometry.spacing, dtype=float)[::-1]  # array-axis order (k, j, i)
    shape = np.asarray(volume.shape, dtype=float)
    return int(sorted(range(3), key=lambda a: (-round(spacing[a], 3), shape[a]))[0])


def labelled_slices(labels: np.ndarray, axis: int) -> list[int]:
    """Indices along ``axis`` of the slices holding at least one label > 0."""
    other = tuple(a for a in range(3) if a != axis)
    return [int(n) for n in np.flatnonzero(np.any(labels > 0, axis=other))]


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D (rows, cols) slice ``index`` along array ``axis``, a writable view (RGB: (rows, cols, 3))."""
    selection: list[slice | int] = [slice(None)] * array.ndim
    selection[axis] = index
    return array[tuple(selection)]


@dataclass
class SliceStack:
    """Normalised 2D slices of one volume along one array axis, resampled to square pixels for the model.

    ``image(n)``: (H', W', 3) float32 in [0, 1]; ``to_native(labels)``: (H', W') -> (H, W) nearest-neighbour back to
    the slice's own grid.
    """

    volume: Volume
    axis: int
    mapping: IntensityMapping

    def __post_init__(self) -> None:
        spacing = np.asarray(self.volume.geometry.spacing, dtype=float)[::-1]
        rows, cols = (a for a in range(3) if a != self.axis)
        self.native_shape = (self.volume.shape[rows], self.volume.shape[cols])
        row_spacing, col_spacing = spacing[rows], spacing[cols]
        finest = min(row_spacing, col_spacing)
        if abs(row_spacing / col_spacing - 1.0) > 1e-3:
            self.model_shape = (max(1, round(self.native_shape[0] * row_spacing / finest)),
                                max(1, round(self.native_shape[1] * col_spacing / finest)))
        else:
            self.model_shape = self.native_shape

    def __len__(self) -> int:
        return self.volume.shape[self.axis]

    def image(self, index: int) -> np.ndarray:
        """Slice ``index`` as backbone input: (H', W', 3) float32 in [0, 1], square pixels."""
        image = self.mapping(take_slice(self.volume.array, self.axis, index))
        if self.model_shape != self.native_shape:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
            tensor = F.interpolate(tensor, size=self.model_shape, mode="bilinear", align_corners=False)
            image = tensor[0].permute(1, 2, 0).numpy()
        return image

    def labels(self, labels: np.ndarray, index: int) -> np.ndarray:
        """The label slice ``index`` on the model grid (H', W') (nearest neighbour)."""
        return self.to_model(take_slice(labels, self.axis, index))

    def to_model(self, labels2d: np.ndarray) -> np.ndarray:
        return _resize_labels(labels2d, self.model_shape)

    def to_native(self, labels2d: np.ndarray) -> np.ndarray:
        return _resize_labels(labels2d, self.native_shape)


def _resize_labels(labels2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if tuple(labels2d.shape) == tuple(shape):
        return labels2d
    tensor = torch.from_numpy(np.ascontiguousarray(labels2d).astype(np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="nearest")[0, 0].numpy().astype(labels2d.dtype)


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def encode_slices(segmenter: OneShotSegmenter, stack: SliceStack, indices: Iterable[int],
                  batch_size: int = 4) -> Iterator[tuple[int, EncodedImage]]:
    """Yield (index, encoded slice) for ``indices``, encoding ``batch_size`` slices per backbone call."""
    for batch in _batches(list(indices), batch_size):
        encoded = segmenter.encode([stack.image(n) for n in batch], batch_size=batch_size)
        yield from zip(batch, encoded, strict=True)


def check_label_grid(volume: Volume, labels: np.ndarray) -> np.ndarray:
    """Labels as an int64 (K, J, I) array on ``volume``'s grid, or :class:`LabelGridError`."""
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise LabelGridError(f"label volume shape {labels.shape} differs from the image's {volume.shape}")
    if labels.dtype.kind == "f" and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise LabelGridError("label volume holds non-integer values; expected a label map")
    if np.any(labels < 0):
        raise LabelGridError("label volume holds negative values; expected a label map")
    return labels.astype(np.int64)


def _slice_range(length: int, slice_range: tuple[int, int] | None) -> tuple[int, int]:
    if slice_range is None:
        return 0, length
    start, stop = slice_range
    start = max(0, start if start >= 0 else length + start)
    stop = min(length, stop if stop >= 0 else length + stop)
    if start >= stop:
        raise ValueError(f"empty slice range {slice_range} for {length} slices")
    return start, stop


def set_references_from_slices(segmenter: OneShotSegmenter, stack: SliceStack, labels: np.ndarray,
                               indices: Sequence[int], batch_size: int = 4) -> dict[int, EncodedImage]:
    """Make the labelled slices ``indices`` the segmenter's reference shots; returns their encodings."""
    encodings: dict[int, EncodedImage] = {}
    for n, encoded in encode_slices(segmenter, stack, indices, batch_size):
        shot_labels = stack.labels(labels, n)
        if not encodings:
            segmenter.set_reference(encoded, shot_labels)
        else:
            segmenter.add_reference(encoded, shot_labels)
        encodings[n] = encoded
    return encodings


def propagate_through_slices(segmenter: OneShotSegmenter, volume: Volume, labels: np.ndarray, *,
                             axis: int | str = 0, slice_range: tuple[int, int] | None = None,
                             preset: str | None = None, progress: ProgressCallback | None = None,
                             batch_size: int = 4) -> np.ndarray:
    """Propagate the labelled slices of ``labels`` to every other slice of ``volume`` in ``slice_range``.

    volume: the study; labels: (K, J, I) label map with one or more labelled slices along ``axis`` (every labelled
    slice is a reference shot; all label values propagate in one pass). Returns the (K, J, I) int64 label map, with
    the labelled slices kept exactly as given and slices outside ``slice_range`` left empty.
    """
    labels = check_label_grid(volume, labels)
    axis = slicing_axis(volume, axis)
    start, stop = _slice_range(volume.shape[axis], slice_range)
    references = labelled_slices(labels, axis)
    if not references:
        raise NoLabelledSliceError("the label volume has no labelled slice: label the structure on at least one "
                                   "slice")
    stack = SliceStack(volume, axis, intensity_mapping(volume, preset))
    set_references_from_slices(segmenter, stack, labels, references, batch_size)
    output = np.zeros_like(labels)
    targets = [n for n in range(start, stop) if n not in set(references)]
    total = len(targets)
    for done, (n, encoded) in enumerate(encode_slices(segmenter, stack, targets, batch_size), start=1):
        take_slice(output, axis, n)[...] = stack.to_native(segmenter.segment(encoded))
        if progress is not None:
            progress(done, total)
    for n in references:
        take_slice(output, axis, n)[...] = take_slice(labels, axis, n)
    return output


def transfer_to_study(segmenter: OneShotSegmenter, reference: Volume, reference_labels: np.ndarray,
                      target: Volume, *, axis: int | str = 0, preset: str | None = None,
                      target_preset: str | None = None, max_shots: int = 8,
                      progress: ProgressCallback | None = None, batch_size: int = 4) -> np.ndarray:
    """Segment every slice of ``target`` from the labelled slices of ``reference``.

    reference_labels: (K, J, I) on the reference grid: one labelled slice, several, or a whole labelled volume (then
    at most ``max_shots`` labelled slices, evenly spread, serve as shots). ``axis`` is resolved per study, so
    "axial" picks each study's own axial axis. Returns the target's (K, J, I) int64 label map.
    """
    reference_labels = check_label_grid(reference, reference_labels)
    ref_axis = slicing_axis(reference, axis)
    tgt_axis = slicing_axis(target, axis)
    labelled = labelled_slices(reference_labels, ref_axis)
    if not labelled:
        raise NoLabelledSliceError("the reference label volume has no labelled slice")
    if len(labelled) > max_shots:
        labelled = [labelled[round(i)] for i in np.linspace(0, len(labelled) - 1, max_shots)]
    ref_stack = SliceStack(reference, ref_axis, intensity_mapping(reference, preset))
    set_references_from_slices(segmenter, ref_stack, reference_labels, labelled, batch_size)
    tgt_stack = SliceStack(target, tgt_axis, intensity_mapping(target, target_preset or preset))
    output = np.zeros(target.shape, dtype=np.int64)
    total = len(tgt_stack)
    for done, (n, encoded) in enumerate(encode_slices(segmenter, tgt_stack, range(total), batch_size), start=1):
        take_slice(output, tgt_axis, n)[...] = tgt_stack.to_native(segmenter.segment(encoded))
        if progress is not None:
            progress(done, total)
    return output
