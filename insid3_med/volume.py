"""Slice-wise processing of volumes: propagation through the slices of a study and transfer to other studies.

Volumes are :class:`~insid3_med.imaging.geometry.Volume` objects, (K, J, I) arrays. A slicing ``axis`` is an array
axis (0 = K, 1 = J, 2 = I); :func:`slicing_axis` also accepts "axial", "coronal", "sagittal" (patient space), and
:func:`propagation_axis` "auto" (the axis across which the labelled slices were drawn, :func:`drawn_axis`).
Outputs are (K, J, I) int label maps on the input grid.

Two modes (``mode=``):

- ``"volume"`` (default): the slices are a sequence. A square region around the labelled structures is cut from
  every slice and zoomed to the model size; labels are chained outwards from the labelled slice(s), each new slice
  taking the labels of its most similar nearby patches in the labelled slice and the last predicted slices, kept
  near where demons registration carries the labelled slice's mask, sharpened with the slice's grey values, and
  stopped where a structure ends
  (:mod:`insid3_med.propagation`, settings in :class:`~insid3_med.propagation.PropagationParams`).
- ``"published"``: the published method applied to each slice independently, every labelled slice a shot
  (the segmenter's own image size and parameters); slices are streamed, encoded once, segmented and released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from insid3_med.imaging.geometry import Volume
from insid3_med.imaging.intensity import IntensityMapping, intensity_mapping
from insid3_med.interpolation import interpolate_between_slices
from insid3_med.predictor import EncodedImage, OneShotSegmenter
from insid3_med.propagation import (
    ContextSlice,
    PropagationParams,
    SquareBox,
    crop_square,
    encode_crops,
    intensity_likelihood,
    keep_drawn_labels,
    label_dtype,
    label_slice,
    labelled_intensity_histograms,
    majority_labels,
    model_input_size,
    nearest_line,
    neighbourhood_mask,
    one_tissue_partners,
    part_boundaries,
    paste_square,
    patch_label_fractions,
    patch_side,
    propagate_crops,
    region_of_interest,
    split_by_part_boundary,
    square_box_around,
    structure_groups,
)
from insid3_med.refinement import boundary_box, refine_boundaries, walk_calibration

ProgressCallback = Callable[[int, int], None]

ARRAY_AXIS_NAMES = {"k": 0, "j": 1, "i": 2}
ARRAY_AXIS_LETTERS = "kji"  # array axis -> its name in ARRAY_AXIS_NAMES
PATIENT_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # LPS component of the slice normal
PROPAGATION_MODES = ("volume", "published")
AUTO_AXIS = "auto"


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
    if name == AUTO_AXIS:
        raise ValueError("axis 'auto' is chosen from the labels: resolve it with propagation_axis")
    raise ValueError(f"unknown axis {axis!r}: use 0/1/2, k/j/i, axial/coronal/sagittal or auto")


def is_auto_axis(axis: int | str) -> bool:
    """Whether ``axis`` asks for the axis to be chosen from the labels (``"auto"``, any case)."""
    return isinstance(axis, str) and axis.lower() == AUTO_AXIS


def drawn_axis(labels: np.ndarray, volume: Volume) -> int | None:
    """The array axis across which the labels were drawn slice by slice, or None where they fill a 3D region.

    labels: (K, J, I). A structure drawn on a few slices of one view holds labels on few slices across that view's
    axis and on many across the two others: the axis with the fewest labelled slices is returned when it has one
    labelled slice or at most half as many as each other axis (ties: the acquisition's slice axis,
    :func:`acquisition_axis`, then K, J, I). A whole segmentation (comparable counts on all axes) gives None.
    Raises :class:`NoLabelledSliceError` when nothing is labelled.
    """
    counts = [len(labelled_slices(labels, axis)) for axis in range(3)]
    if counts[0] == 0:
        raise NoLabelledSliceError("the label volume has no labelled voxel: label the structure on at least one "
                                   "slice")
    fewest = min(counts)
    tied = [axis for axis in range(3) if counts[axis] == fewest]
    others = [counts[axis] for axis in range(3) if axis not in tied]
    if fewest != 1 and (not others or 2 * fewest > min(others)):
        return None
    preferred = acquisition_axis(volume)
    return preferred if preferred in tied else tied[0]


def propagation_axis(volume: Volume, labels: np.ndarray, axis: int | str) -> int:
    """The array axis to slice along: ``axis`` as :func:`slicing_axis` reads it, or for ``"auto"`` the axis the
    labels were drawn across (:func:`drawn_axis`), the acquisition's slice axis where they fill a 3D region."""
    if is_auto_axis(axis):
        drawn = drawn_axis(labels, volume)
        return drawn if drawn is not None else acquisition_axis(volume)
    return slicing_axis(volume, axis)


def axis_mismatch(volume: Volume, labels: np.ndarray, axis: int) -> str | None:
    """A sentence for the user where the labels were drawn slice by slice across another axis than ``axis`` (so
    that slicing along ``axis`` would find many slices labelled and keep them as drawn), else None. Drawn slice by
    slice: on one slice or on slices with gaps between them across the axis :func:`drawn_axis` finds (a whole 3D
    segmentation, labelled on consecutive slices across every axis, gives no warning)."""
    drawn = drawn_axis(labels, volume)
    if drawn is None or drawn == axis:
        return None
    slices = labelled_slices(labels, drawn)
    count = len(slices)
    if count > 1 and slices[-1] - slices[0] + 1 == count:
        return None
    names = ARRAY_AXIS_LETTERS
    return (f"the labels are drawn on {count} slice{'s' if count != 1 else ''} across axis {names[drawn]} "
            f"({volume.geometry.slice_plane(drawn)}) but slices are taken along axis {names[axis]} "
            f"({volume.geometry.slice_plane(axis)}), where {len(labelled_slices(labels, axis))} slices hold labels "
            f"and are kept as drawn: give the axis auto (the default) or {names[drawn]}")


def acquisition_axis(volume: Volume) -> int:
    """The array axis most likely to be the acquisition's slice axis: the one of largest spacing when the spacing is
    anisotropic (largest / smallest > 1.2), else the axis with at most half the voxels of both others, else the
    axial one."""
    spacing = np.asarray(volume.geometry.spacing, dtype=float)[::-1]  # array-axis order (k, j, i)
    shape = np.asarray(volume.shape)
    if spacing.max() / spacing.min() > 1.2:
        return int(np.argmax(spacing))
    thinnest = int(np.argmin(shape))
    if shape[thinnest] * 2 <= np.delete(shape, thinnest).min():
        return thinnest
    return slicing_axis(volume, "axial")


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
        rows, cols = (a for a in range(3) if a != self.axis)
        self.native_shape = (self.volume.shape[rows], self.volume.shape[cols])
        row_spacing, col_spacing = self.volume.in_plane_spacing(self.axis)
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
    """Labels as a (K, J, I) integer array on ``volume``'s grid, or :class:`LabelGridError`.

    The dtype is the smallest of uint8, int32 and int64 that holds the labels (no copy when the input already has
    it): a 512 x 512 x 300 label map takes 79 MB in uint8 instead of 629 MB in int64.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise LabelGridError(f"label volume shape {labels.shape} differs from the image's {volume.shape}")
    if labels.dtype.kind == "f" and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise LabelGridError("label volume holds non-integer values; expected a label map")
    if np.any(labels < 0):
        raise LabelGridError("label volume holds negative values; expected a label map")
    return labels.astype(label_dtype([float(labels.max())] if labels.size else []), copy=False)


def resolve_slice_range(length: int, slice_range: tuple[int, int] | None) -> tuple[int, int]:
    """(start, stop) of the half-open ``slice_range`` among ``length`` slices (negative ends count from the end;
    None: all); a ValueError where it is empty."""
    if slice_range is None:
        return 0, length
    start, stop = slice_range
    start = max(0, start if start >= 0 else length + start)
    stop = min(length, stop if stop >= 0 else length + stop)
    if start >= stop:
        given = f"{slice_range[0]}:{slice_range[1]}"
        resolved = f" (that is {start}:{stop}: a negative end counts from the end)" if min(slice_range) < 0 else ""
        raise ValueError(f"empty slice range {given}{resolved} for {length} slices (0:{length})")
    return start, stop


def check_range_holds_a_labelled_slice(references: Sequence[int], start: int, stop: int, axis: int) -> None:
    """Raise :class:`NoLabelledSliceError` unless a labelled slice lies in ``start:stop``: the volume mode chains
    from the labelled slices, so a range without one would stay empty."""
    if not any(start <= n < stop for n in references):
        shown = ", ".join(str(n) for n in references[:10]) + (", ..." if len(references) > 10 else "")
        raise NoLabelledSliceError(f"no labelled slice inside the slice range {start}:{stop} along axis "
                                   f"{ARRAY_AXIS_LETTERS[axis]} (the labelled slices are {shown}): the volume mode "
                                   "propagates from a labelled slice, so the range must hold one")


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


def propagation_description(mode: str = "volume", params: PropagationParams | None = None) -> dict[str, object]:
    """What determines :func:`propagate_through_slices`'s and :func:`transfer_to_study`'s output beyond the segmenter:
    the mode and, in ``"volume"`` mode, every :class:`PropagationParams` field (for reports and result caches).
    Settings (``params``) for the published mode raise a ValueError: it has none."""
    check_propagation_mode(mode)
    if mode == "published":
        if params is not None:
            raise ValueError("propagation settings apply to the volume mode only; the published mode has none")
        return {"mode": mode}
    return {"mode": mode, **asdict(params or PropagationParams())}


def check_propagation_mode(mode: str) -> None:
    """Raise a ValueError naming the choices unless ``mode`` is one of :data:`PROPAGATION_MODES`."""
    if mode not in PROPAGATION_MODES:
        raise ValueError(f"unknown propagation mode {mode!r}; choose from {', '.join(PROPAGATION_MODES)}")


def propagate_through_slices(segmenter: OneShotSegmenter, volume: Volume, labels: np.ndarray, *,
                             axis: int | str = AUTO_AXIS, slice_range: tuple[int, int] | None = None,
                             preset: str | None = None, progress: ProgressCallback | None = None,
                             batch_size: int = 4, mode: str = "volume",
                             params: PropagationParams | None = None) -> np.ndarray:
    """Propagate the labelled slices of ``labels`` to the other slices of ``volume`` in ``slice_range``.

    volume: the study; labels: (K, J, I) label map with one or more labelled slices along ``axis`` (all label values
    propagate in one pass); axis: as :func:`propagation_axis` reads it, "auto" (default) the one the labels were drawn
    across. mode: ``"volume"`` (chained propagation, ``params``) or ``"published"`` (every slice
    segmented on its own, every labelled slice a shot). Returns the (K, J, I) int64 label map, with the structures
    drawn on a labelled slice kept there exactly as drawn (in ``"volume"`` mode a structure drawn on other slices only
    is predicted on it too) and slices outside ``slice_range`` left empty; in ``"volume"`` mode the slices beyond a
    structure's end are empty too.
    """
    check_propagation_mode(mode)
    labels = check_label_grid(volume, labels)
    axis = propagation_axis(volume, labels, axis)
    start, stop = resolve_slice_range(volume.shape[axis], slice_range)
    references = labelled_slices(labels, axis)
    if not references:
        raise NoLabelledSliceError("the label volume has no labelled slice: label the structure on at least one "
                                   "slice")
    if mode == "volume":
        check_range_holds_a_labelled_slice(references, start, stop, axis)
    stack = SliceStack(volume, axis, intensity_mapping(volume, preset))
    if mode == "volume":
        params = params or PropagationParams()
        output = _propagate_volume_mode(segmenter, stack, labels, references, start, stop, params, progress,
                                        batch_size)
        split_one_tissue_parts(output, stack, labels, references, params)
        return refine_volume_boundaries(output, stack, references, params)
    set_references_from_slices(segmenter, stack, labels, references, batch_size)
    output = np.zeros(labels.shape, dtype=np.int64)
    targets = [n for n in range(start, stop) if n not in set(references)]
    total = len(targets)
    for done, (n, encoded) in enumerate(encode_slices(segmenter, stack, targets, batch_size), start=1):
        take_slice(output, axis, n)[...] = stack.to_native(segmenter.segment(encoded))
        if progress is not None:
            progress(done, total)
    for n in references:
        take_slice(output, axis, n)[...] = take_slice(labels, axis, n)
    return output


CPU_LOOKAHEAD = 2
"""Slices a :class:`CropFeatures` encodes at a time on a CPU. There a crop costs the same encoded alone or in a batch,
so a chain's crops encoded ahead past a structure's end are lost time: against 4 at a time, 2 took 8-15% less time
on 16 hippocampus episodes (1 and 2 threads) and 4-6% less on 6 ACDC volumes (2 threads), with identical labels; 1
at a time was 1-6% slower than 2 with 2 threads. On a GPU, where a small batch costs about as much as one crop,
``batch_size`` holds."""


class CropFeatures:
    """Backbone features of every slice's crop, encoded on first use, ``batch_size`` slices at a time (at most
    :data:`CPU_LOOKAHEAD` on a CPU) onwards in the direction of the last request (a chain walks outwards slice by
    slice).

    ``features(n)``: (N, C) plain L2-normalised patch features; ``image(n)``: (S, S) grey crop in [0, 1]. Only the
    slices within ``2 * batch_size`` of the last request stay cached (a slice further away is encoded again if asked
    for), so memory does not grow with the number of slices.
    """

    def __init__(self, segmenter: OneShotSegmenter, stack: SliceStack, box: SquareBox, params: PropagationParams,
                 batch_size: int = 4, image_size: int | None = None) -> None:
        self.backbone = segmenter.backbone
        self.stack, self.box, self.params = stack, box, params
        self.image_size = patch_side(self.backbone, image_size or params.image_size)
        device = getattr(self.backbone, "device", None)
        on_cpu = device is None or torch.device(device).type == "cpu"
        self.batch_size = max(1, min(batch_size, CPU_LOOKAHEAD) if on_cpu else batch_size)
        side = self.image_size // self.backbone.patch_size
        self.grid = (side, side)
        self._features: dict[int, torch.Tensor] = {}
        self._crops: dict[int, np.ndarray] = {}
        self._last = -1
        self._encoded = 0

    def crop(self, index: int) -> np.ndarray:
        """(S, S, 3) float32 crop of slice ``index``."""
        if index not in self._crops:
            self._crops[index] = crop_square(self.stack.image(index), self.box)
        return self._crops[index]

    def image(self, index: int) -> np.ndarray:
        return self.crop(index)[..., 0]

    def features(self, index: int) -> torch.Tensor:
        if index not in self._features:
            step = -1 if index < self._last else 1
            batch = [n for n in range(index, index + step * self.batch_size, step)
                     if 0 <= n < len(self.stack) and n not in self._features]
            encoded = encode_crops(self.backbone, [self.crop(n) for n in batch], self.image_size, self.params.flip,
                                   self.batch_size)
            self._features.update(zip(batch, encoded, strict=True))
            self._encoded += len(batch)
        self._last = index
        self._forget_far_from(index)
        return self._features[index]

    def _forget_far_from(self, index: int) -> None:
        keep = 2 * self.batch_size
        for cache in (self._features, self._crops):
            for n in [n for n in cache if abs(n - index) > keep]:
                del cache[n]

    @property
    def encoded(self) -> int:
        """Slices encoded so far (a slice encoded again counts again)."""
        return self._encoded


def _propagate_volume_mode(segmenter: OneShotSegmenter, stack: SliceStack, labels: np.ndarray,
                           references: Sequence[int], start: int, stop: int, params: PropagationParams,
                           progress: ProgressCallback | None, batch_size: int) -> np.ndarray:
    """``mode="volume"`` of :func:`propagate_through_slices` on an already checked label map."""
    if params.crop_ensemble:
        return _propagate_crop_ensemble(segmenter, stack, labels, references, start, stop, params, progress,
                                        batch_size)
    axis = stack.axis
    anchors_model = {n: stack.labels(labels, n) for n in references}
    values = sorted({int(v) for lab in anchors_model.values() for v in np.unique(lab) if v > 0})
    groups = structure_groups(anchors_model, values)  # independent_structures: merged by confidence in one crop
    if len(groups) > 1:
        return _propagate_groups(segmenter, stack, labels, groups, start, stop, params, progress, batch_size)
    box = region_of_interest(list(anchors_model.values()), params.crop_scale, params.min_crop_fraction)
    anchors = {n: crop_square(lab, box) for n, lab in anchors_model.items()}
    size = model_input_size(list(anchors.values()), values, segmenter.backbone.patch_size, params)
    source = CropFeatures(segmenter, stack, box, params, batch_size, size)
    total = len([n for n in range(start, stop) if n not in set(references)])
    done = 0

    def step(index: int) -> None:
        nonlocal done
        if start <= index < stop:
            done += 1
            if progress is not None:
                progress(min(done, total), total)

    chain_start, chain_stop = min(start, min(references)), max(stop, max(references) + 1)
    crops = propagate_crops(anchors, source.features, values, source.grid, params, start=chain_start,
                            stop=chain_stop, images=source.image, progress=step)
    followed = None  # slice index -> (H', W') labels where a structure left the crop, else the crops are pasted
    if params.crop_handoffs and len(values) > 1:
        followed = follow_past_crop_edge(segmenter, stack, crops, anchors, source, values, params, chain_start,
                                         chain_stop, batch_size)
    output = np.zeros(labels.shape, dtype=np.int64)
    for n in followed if followed is not None else crops:
        if start <= n < stop and n not in anchors:
            labels2d = followed[n] if followed is not None else paste_square(crops[n], box, stack.model_shape)
            take_slice(output, axis, n)[...] = stack.to_native(labels2d)
    if params.fill_between_labelled and len(references) > 1:
        _fill_between_labelled(output, labels, axis, stack.volume, start, stop)
    for n in references:
        take_slice(output, axis, n)[...] = take_slice(labels, axis, n)
    if progress is not None and done < total:
        progress(total, total)
    return output


def near_crop_edge(mask: np.ndarray, box: SquareBox, shape: tuple[int, int], margin: int) -> bool:
    """Whether the (H, W) ``mask`` (slice grid of ``shape``) comes within ``margin`` pixels of a side of ``box``
    that lies inside the slice (a side on or past the slice's edge does not count: nothing lies beyond it)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return False
    bottom, right = box.top + box.side, box.left + box.side
    return bool((box.top > 0 and rows.min() < box.top + margin) or (box.left > 0 and cols.min() < box.left + margin)
                or (bottom < shape[0] and rows.max() >= bottom - margin)
                or (right < shape[1] and cols.max() >= right - margin))


def follow_past_crop_edge(segmenter: OneShotSegmenter, stack: SliceStack, crops: Mapping[int, np.ndarray],
                          anchors: Mapping[int, np.ndarray], source: CropFeatures, values: Sequence[int],
                          params: PropagationParams, start: int, stop: int, batch_size: int) -> dict[int, np.ndarray]:
    """Follow structures that leave the chain's crop (``params.crop_handoffs``, ``params.handoff_margin``).

    crops: slice index -> (S, S) labels of the joint chain in ``source.box``; anchors: the labelled crops (slice
    index -> (S, S) labels in that box). Per structure and direction away from its labelled slices, the first slice
    where its mask comes within the margin of the crop's side hands the chain off: beyond it the structure's labels
    are dropped and chained again from that slice alone, in a box of the same side centred on it, with the labelled
    crops kept in the context; the new chain's labels take the pixels no other structure holds, and it may hand off
    again. Returns slice index -> (H', W') model-grid labels (the crops' compact dtype) of every slice reached.
    """
    shape = stack.model_shape
    slices = {n: paste_square(np.asarray(crop), source.box, shape) for n, crop in crops.items()}
    dtype = label_dtype(values)
    margin = max(1, round(params.handoff_margin * source.box.side))
    for value in values:
        holders = [n for n in anchors if np.any(anchors[n] == value)]
        context: list[ContextSlice] = []  # the labelled crops, encoded at the first hand-off
        for step in (1, -1):
            index, box = (max(holders) if step > 0 else min(holders)), source.box
            for _ in range(params.crop_handoffs if holders else 0):
                index += step
                while index in slices and np.any(slices[index] == value) and not near_crop_edge(
                        slices[index] == value, box, shape, margin):
                    index += step
                if index not in slices or not np.any(slices[index] == value):
                    break  # the structure ended inside the crop
                for n, labels2d in slices.items():
                    if (n - index) * step > 0:
                        labels2d[labels2d == value] = 0
                box = square_box_around(slices[index] == value, source.box.side)
                if not context:
                    context = [ContextSlice(source.features(n), patch_label_fractions(
                        np.where(anchors[n] == value, value, 0), [value], source.grid)) for n in holders]
                moved = CropFeatures(segmenter, stack, box, params, batch_size, source.image_size)
                anchor = np.where(crop_square(slices[index], box) == value, value, 0)
                lower, upper = (index, stop) if step > 0 else (start, index + 1)
                chained = propagate_crops({index: anchor}, moved.features, [value], moved.grid, params, start=lower,
                                          stop=upper, images=moved.image, extra_context=context)
                for n, crop in chained.items():
                    if n != index:
                        labels2d = slices.setdefault(n, np.zeros(shape, dtype=dtype))
                        labels2d[(paste_square(np.asarray(crop), box, shape) == value) & (labels2d == 0)] = value
    return slices


def split_one_tissue_parts(output: np.ndarray, stack: SliceStack, labels: np.ndarray, references: Sequence[int],
                           params: PropagationParams) -> np.ndarray:
    """``params.split_one_tissue_parts``: the (K, J, I) chain ``output`` with the pixels of every pair of parts of
    one tissue (:func:`insid3_med.propagation.one_tissue_partners` on the labelled slices ``references`` of
    ``labels``) split between the two, on each slice but the labelled ones, by the straight boundary drawn between
    them on the nearest labelled slice that holds both and that a line separates
    (:func:`insid3_med.propagation.straight_part_boundary`). Their union is kept. In place; returned."""
    if not params.split_one_tissue_parts:
        return output
    drawn = {n: take_slice(labels, stack.axis, n) for n in references}
    values = sorted({int(v) for lab in drawn.values() for v in np.unique(lab) if v > 0})
    if len(values) < 2:
        return output
    partners = one_tissue_partners({n: stack.labels(labels, n) for n in references},
                                   lambda n: stack.image(n)[..., 0], values)
    for (a, b), lines in part_boundaries(drawn, values, partners).items():
        for k in range(output.shape[stack.axis]):
            if k not in drawn:
                split_by_part_boundary(take_slice(output, stack.axis, k), a, b, nearest_line(lines, k))
    return output


def refine_volume_boundaries(labels: np.ndarray, stack: SliceStack, keep_slices: Sequence[int],
                             params: PropagationParams,
                             label_weights: Mapping[int, float] | None = None) -> np.ndarray:
    """``params.random_walk_beta``: the (K, J, I) ``labels`` of ``stack``'s volume with the voxels within
    ``params.random_walk_band`` pixels of a boundary re-decided by a 3D random walk on its grey values
    (:func:`insid3_med.refinement.refine_boundaries`; the slices ``keep_slices`` stay as they are), refined in
    place and returned (unchanged if the beta is None). label_weights: label value -> factor on its walk
    probability (default: calibrated on ``keep_slices``, :func:`insid3_med.refinement.walk_calibration`)."""
    part = _walk_part(labels, stack, keep_slices, params)
    if part is None or params.random_walk_beta is None:
        return labels
    box, grey, kept = part
    labels[box] = refine_boundaries(labels[box], grey, stack.axis, beta=params.random_walk_beta,
                                    band=params.random_walk_band, keep_slices=kept, label_weights=label_weights)
    return labels


def volume_walk_calibration(labels: np.ndarray, stack: SliceStack, keep_slices: Sequence[int],
                            params: PropagationParams) -> dict[int, float]:
    """:func:`insid3_med.refinement.walk_calibration` of the (K, J, I) ``labels`` of ``stack``'s volume on its
    slices ``keep_slices`` (label value -> factor; empty without ``params.random_walk_beta``)."""
    part = _walk_part(labels, stack, keep_slices, params)
    if part is None or params.random_walk_beta is None:
        return {}
    box, grey, kept = part
    return walk_calibration(labels[box], grey, stack.axis, kept, beta=params.random_walk_beta,
                            band=params.random_walk_band)


def _walk_part(labels: np.ndarray, stack: SliceStack, keep_slices: Sequence[int], params: PropagationParams
               ) -> tuple[tuple[slice, slice, slice], np.ndarray, list[int]] | None:
    """The part of ``labels`` the walk works in (:func:`insid3_med.refinement.boundary_box`), the grey values in
    [0, 1] there (RGB averaged; only that part of the volume is mapped) and ``keep_slices`` counted from its first
    slice; None without a walk or without structures."""
    if params.random_walk_beta is None:
        return None
    box = boundary_box(labels, stack.axis, params.random_walk_band)
    if box is None:
        return None
    array = stack.volume.array[box]
    grey = stack.mapping(array).mean(axis=-1) if stack.volume.is_rgb else stack.mapping.to_unit(array)
    first = box[stack.axis].start
    return box, grey, [n - first for n in keep_slices]


def _fill_between_labelled(output: np.ndarray, labels: np.ndarray, axis: int, volume: Volume, start: int,
                           stop: int) -> None:
    """``params.fill_between_labelled``: in place, the (K, J, I) ``output``'s background voxels in slices
    [start, stop) take the structure that shape-based interpolation between the labelled slices of ``labels`` (the
    slices it holds anything on) puts there (in mm, with the volume's in-plane spacing)."""
    filled = interpolate_between_slices(labels, axis, volume.in_plane_spacing(axis))
    inside = np.zeros(labels.shape[axis], dtype=bool)
    inside[start:stop] = True
    shape = [labels.shape[axis] if a == axis else 1 for a in range(labels.ndim)]
    take = (output == 0) & (filled != 0) & inside.reshape(shape)
    output[take] = filled[take]


def _propagate_crop_ensemble(segmenter: OneShotSegmenter, stack: SliceStack, labels: np.ndarray,
                             references: Sequence[int], start: int, stop: int, params: PropagationParams,
                             progress: ProgressCallback | None, batch_size: int) -> np.ndarray:
    """``params.crop_ensemble``: one volume-mode chain per crop scale, merged by :func:`majority_labels` (the
    labelled slices, kept by every chain, stay as given). Member outputs are held in the smallest label dtype."""
    scales = params.crop_ensemble
    values = [int(v) for v in np.unique(labels) if v > 0]
    members = []
    for number, scale in enumerate(scales):

        def step(done: int, total: int, number: int = number) -> None:
            if progress is not None:
                progress(number * total + done, len(scales) * total)

        member = replace(params, crop_scale=scale, crop_ensemble=())
        output = _propagate_volume_mode(segmenter, stack, labels, references, start, stop, member, step, batch_size)
        members.append(output.astype(label_dtype(values)))
    return majority_labels(members)


def merge_by_nearest_labelled_slice(results: Sequence[tuple[np.ndarray, Sequence[int]]], axis: int) -> np.ndarray:
    """One (K, J, I) int64 label map from several, each given with the labelled slice indices (along ``axis``) it
    was propagated from: a voxel labelled in several maps takes the label of the map with a labelled slice nearest
    to it (the first such map on a tie)."""
    if not results:
        raise ValueError("nothing to merge")
    shape = results[0][0].shape
    output = np.zeros(shape, dtype=np.int64)
    owner_distance = np.full(shape, np.inf)  # per voxel: its owner's distance to a labelled slice
    positions = np.arange(shape[axis])
    view = [shape[axis] if a == axis else 1 for a in range(len(shape))]
    for labels, slices in results:
        nearest = np.min(np.abs(positions[:, None] - np.asarray(slices)[None, :]), axis=1)
        distance = np.broadcast_to(nearest.reshape(view), shape)
        take = (labels != 0) & (distance < owner_distance)
        output[take] = labels[take]
        owner_distance[take] = distance[take]
    return output


def _propagate_groups(segmenter: OneShotSegmenter, stack: SliceStack, labels: np.ndarray,
                      groups: Sequence[tuple[list[int], list[int]]], start: int, stop: int, params: PropagationParams,
                      progress: ProgressCallback | None, batch_size: int) -> np.ndarray:
    """Structures drawn on different labelled slices (:func:`insid3_med.propagation.structure_groups`): each group
    chained from its own slices in its own crop, as if labelled alone, then merged by
    :func:`merge_by_nearest_labelled_slice`. Measured (harness, ``each_largest`` slice kind): see reports/RESULTS.md."""
    axis = stack.axis
    results = []
    for number, (holders, group) in enumerate(groups):
        own = np.zeros_like(labels)
        for n in holders:
            drawn = take_slice(labels, axis, n)
            take_slice(own, axis, n)[...] = np.where(np.isin(drawn, group), drawn, 0)

        def step(done: int, total: int, number: int = number) -> None:
            if progress is not None:
                progress(number * total + done, len(groups) * total)

        results.append((_propagate_volume_mode(segmenter, stack, own, holders, start, stop, params, step, batch_size),
                        holders))
    output = merge_by_nearest_labelled_slice(results, axis)
    for n in sorted({n for holders, _ in groups for n in holders}):  # the other structures' chains stay there
        take_slice(output, axis, n)[...] = keep_drawn_labels(take_slice(output, axis, n), take_slice(labels, axis, n))
    return output


def transfer_to_study(segmenter: OneShotSegmenter, reference: Volume, reference_labels: np.ndarray,
                      target: Volume, *, axis: int | str = AUTO_AXIS, preset: str | None = None,
                      target_preset: str | None = None, max_shots: int = 8,
                      progress: ProgressCallback | None = None, batch_size: int = 4, mode: str = "volume",
                      params: PropagationParams | None = None, same_subject: bool = False) -> np.ndarray:
    """Segment ``target`` from the labelled slices of ``reference``.

    reference_labels: (K, J, I) on the reference grid: one labelled slice, several, or a whole labelled volume (then
    at most ``max_shots`` labelled slices, evenly spread, serve as shots). ``axis`` is resolved per study, so
    "axial" picks each study's own axial axis, and "auto" (default) the plane the reference was labelled in
    (:func:`study_axes`). same_subject: ``target`` is another frame of the reference's subject (a cine's phase), which
    registers on the coarser grid ``params.frames_registration_voxels``. mode ``"volume"`` (default): an affine
    registration of the two studies says which target slice holds the labelled anatomy and roughly where; that
    slice is labelled from the shots (feature matching kept near the registered labels), then chained through the
    target as in :func:`propagate_through_slices`. mode ``"published"``: every target slice segmented on its own
    from the shots. Returns the target's (K', J', I') int64 label map. Several targets of one reference:
    :class:`StudyTransfer`, which chains the reference through itself once.
    """
    return StudyTransfer(segmenter, reference, reference_labels, axis=axis, preset=preset, max_shots=max_shots,
                         batch_size=batch_size, mode=mode, params=params).segment(target, target_preset=target_preset,
                                                                                 progress=progress,
                                                                                 same_subject=same_subject)


class StudyTransfer:
    """A labelled reference study, ready to segment other studies (:func:`transfer_to_study` for each target).

    What depends on the reference alone is done once, on the first target: in the volume mode its labelled slices
    chained through the reference itself (:func:`reference_self_propagation`) and the walk's calibration on them.
    ``transfer`` to many studies, a MONAI bundle run and every frame of a cine each pay for it once. Each
    :meth:`segment` gives exactly what :func:`transfer_to_study` gives for that target with the same arguments.
    """

    def __init__(self, segmenter: OneShotSegmenter, reference: Volume, reference_labels: np.ndarray, *,
                 axis: int | str = AUTO_AXIS, preset: str | None = None, max_shots: int = 8, batch_size: int = 4,
                 mode: str = "volume", params: PropagationParams | None = None) -> None:
        check_propagation_mode(mode)
        self.segmenter, self.reference, self.axis = segmenter, reference, axis
        self.preset, self.batch_size, self.mode = preset, batch_size, mode
        self.params = params or PropagationParams()
        self.reference_labels = check_label_grid(reference, reference_labels)
        ref_axis = propagation_axis(reference, self.reference_labels, axis)
        labelled = labelled_slices(self.reference_labels, ref_axis)
        if not labelled:
            raise NoLabelledSliceError("the reference label volume has no labelled slice")
        if len(labelled) > max_shots:
            labelled = [labelled[round(i)] for i in np.linspace(0, len(labelled) - 1, max_shots)]
        self.shots = labelled
        self.ref_stack = SliceStack(reference, ref_axis, intensity_mapping(reference, preset))
        self._chain: ReferenceChain | None = None

    def target_axis(self, target: Volume) -> int:
        """The array axis ``target`` is sliced along (:func:`study_axes`)."""
        return study_axes(self.reference, self.reference_labels, target, self.axis)[1]

    def segment(self, target: Volume, *, target_preset: str | None = None,
                progress: ProgressCallback | None = None, same_subject: bool = False) -> np.ndarray:
        """``target`` -> its (K', J', I') int64 label map (``target_preset``: its intensity preset, default the
        reference's; ``same_subject``: it is another frame of the reference's subject, as in
        :func:`transfer_to_study`)."""
        tgt_stack = SliceStack(target, self.target_axis(target),
                               intensity_mapping(target, target_preset or self.preset))
        if self.mode == "volume":
            if self._chain is None:
                self._chain = reference_chain(self.segmenter, self.ref_stack, self.reference_labels, self.shots,
                                              self.params, self.batch_size)
            voxels = (self.params.frames_registration_voxels if same_subject
                      else self.params.transfer_registration_voxels)
            return _transfer_volume_mode(self.segmenter, self._chain, tgt_stack, self.params, progress,
                                         self.batch_size, voxels)
        set_references_from_slices(self.segmenter, self.ref_stack, self.reference_labels, self.shots,
                                   self.batch_size)
        output = np.zeros(target.shape, dtype=np.int64)
        total = len(tgt_stack)
        for done, (n, encoded) in enumerate(encode_slices(self.segmenter, tgt_stack, range(total), self.batch_size),
                                            start=1):
            take_slice(output, tgt_stack.axis, n)[...] = tgt_stack.to_native(self.segmenter.segment(encoded))
            if progress is not None:
                progress(done, total)
        return output


def study_axes(reference: Volume, reference_labels: np.ndarray, target: Volume, axis: int | str) -> tuple[int, int]:
    """(reference array axis, target array axis) for :func:`transfer_to_study`: ``axis`` resolved in each study;
    "auto" takes the reference's from its labels (:func:`propagation_axis`) and the target's as the same anatomical
    plane (:meth:`~insid3_med.imaging.geometry.Geometry.slice_plane`), whatever the order of the target's array axes."""
    ref_axis = propagation_axis(reference, reference_labels, axis)
    if is_auto_axis(axis):
        return ref_axis, slicing_axis(target, reference.geometry.slice_plane(ref_axis))
    return ref_axis, slicing_axis(target, axis)


def registered_first_slice(ref_stack: SliceStack, reference_labels: np.ndarray, shots: Sequence[int],
                           tgt_stack: SliceStack, max_voxels: int | None) -> tuple[int, np.ndarray]:
    """Where the reference's labelled anatomy lies in the target: (target slice index, its (H', W') model-grid labels).

    The shots' labels are carried onto the target by affine registration of the two studies: the target slice
    holding most of them is returned, with the labels that a copy thickened by a slice on each side (so that a
    scaled sheet has no holes) carries onto it. If registration carries nothing, the labels of the middle shot are
    placed on the target slice at the same relative height, resized to its slice. max_voxels: the studies'
    registration grids' size (:func:`insid3_med.registration.study_image`).
    """
    from insid3_med.registration import affine_study_transform, carry_labels_to_study

    axis, length = ref_stack.axis, len(ref_stack)
    sheet, thick = np.zeros_like(reference_labels), np.zeros_like(reference_labels)
    for n in shots:
        take_slice(sheet, axis, n)[...] = take_slice(reference_labels, axis, n)
        for m in (n - 1, n, n + 1):
            if 0 <= m < length:
                slab = take_slice(thick, axis, m)
                slab[...] = np.where(slab > 0, slab, take_slice(reference_labels, axis, n))
    other = tuple(a for a in range(3) if a != tgt_stack.axis)
    try:
        transform = affine_study_transform(tgt_stack.volume, ref_stack.volume, max_voxels=max_voxels)
        areas = np.count_nonzero(carry_labels_to_study(ref_stack.volume, sheet, tgt_stack.volume, transform),
                                 axis=other)
        carried = carry_labels_to_study(ref_stack.volume, thick, tgt_stack.volume, transform)
    except RuntimeError:  # SimpleITK failed to register (for example too few overlapping samples)
        carried = np.zeros(tgt_stack.volume.shape, dtype=np.int64)
        areas = np.zeros(len(tgt_stack), dtype=np.int64)
    if not areas.any():
        areas = np.count_nonzero(carried, axis=other)
    if areas.any():
        index = int(np.argmax(areas))
        return index, tgt_stack.to_model(take_slice(carried, tgt_stack.axis, index))
    middle = shots[len(shots) // 2]
    index = min(len(tgt_stack) - 1, round((middle + 0.5) * len(tgt_stack) / length - 0.5))
    return index, _resize_labels(ref_stack.labels(reference_labels, middle), tgt_stack.model_shape)


def most_similar_slice(source: CropFeatures, context: Sequence[ContextSlice], allowed: torch.Tensor, around: int,
                       reach: int) -> int:
    """The slice within ``reach`` of ``around`` that best holds what the context slices label: the highest mean, over
    the context's structure patches (soft label of a structure > 0.5), of their best cosine similarity to one of the
    slice's patches within the neighbourhood ``allowed``."""
    best, best_score = around, -np.inf
    for index in range(max(0, around - reach), min(len(source.stack), around + reach + 1)):
        target = source.features(index)
        scores = []
        for shot in context:
            structure = shot.labels[:, 1:].sum(dim=1) > 0.5
            if bool(structure.any()):
                similarity = (shot.features[structure] @ target.transpose(0, 1)).masked_fill(~allowed[structure],
                                                                                            -torch.inf)
                scores.append(float(similarity.max(dim=1).values.mean()))
        score = max(scores, default=-np.inf)
        if score > best_score:
            best, best_score = index, score
    return best


def reference_self_propagation(segmenter: OneShotSegmenter, ref_stack: SliceStack, reference_labels: np.ndarray,
                               shots: Sequence[int], params: PropagationParams, batch_size: int = 4) -> np.ndarray:
    """The reference's labelled slices chained through the reference study itself, exactly as
    :func:`propagate_through_slices` does (structures drawn on different slices each chained from their own), with
    the ``transfer_reference_*`` gate, union gate and stop settings: its (K, J, I) int64 label map, shots kept as
    given, so that every reference slice the structures reach holds (pseudo-)labels."""
    params = replace(params, gate_tracking=params.transfer_reference_gate_tracking,
                     gate_sigma=params.transfer_reference_gate_sigma,
                     stop_confidence=params.transfer_reference_stop_confidence,
                     gate_union=params.transfer_reference_gate_union)
    pseudo = _propagate_volume_mode(segmenter, ref_stack, reference_labels, shots, 0, len(ref_stack), params, None,
                                    batch_size)
    split_one_tissue_parts(pseudo, ref_stack, reference_labels, shots, params)
    return refine_volume_boundaries(pseudo, ref_stack, shots, params)


def registered_reference(ref_stack: SliceStack, reference_labels: np.ndarray, tgt_stack: SliceStack,
                         deformable_iterations: int, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference's labels and slice heights on the target's grid, by registration of the two studies.

    Returns ((K', J', I') int64 labels, (K', J', I') int64 index of the reference slice each target voxel comes
    from, -1 outside the reference), or None where SimpleITK cannot register them. Affine (Mattes MI), then
    ``deformable_iterations`` of 3D demons (0: affine only), on grids of at most ``max_voxels``
    (:func:`insid3_med.registration.study_image`).
    """
    from insid3_med.registration import affine_study_transform, carry_labels_to_study, deformable_study_transform

    target, reference = tgt_stack.volume, ref_stack.volume
    try:
        if deformable_iterations > 0:  # one intensity scaling of each study serves both registrations
            transform = deformable_study_transform(target, reference, iterations=deformable_iterations,
                                                  max_voxels=max_voxels)
        else:
            transform = affine_study_transform(target, reference, max_voxels=max_voxels)
    except RuntimeError:  # SimpleITK failed to register (for example too few overlapping samples)
        return None
    shape = [1, 1, 1]
    shape[ref_stack.axis] = -1
    heights = np.broadcast_to((np.arange(len(ref_stack)) + 1).reshape(shape), reference.shape)
    carried = carry_labels_to_study(reference, reference_labels, target, transform)
    return carried, carry_labels_to_study(reference, heights, target, transform) - 1


def matching_reference_slices(carried: np.ndarray, heights: np.ndarray, tgt_stack: SliceStack) -> dict[int, int]:
    """Target slice index -> the reference slice at its height: the median reference slice index carried onto the
    target slice's structure voxels (onto all its voxels inside the reference where it holds none)."""
    matches: dict[int, int] = {}
    for n in range(len(tgt_stack)):
        height, labels = take_slice(heights, tgt_stack.axis, n), take_slice(carried, tgt_stack.axis, n)
        inside = height >= 0
        chosen = height[inside & (labels > 0)] if np.any(inside & (labels > 0)) else height[inside]
        if chosen.size:
            matches[n] = int(round(float(np.median(chosen))))
    return matches


def _transfer_by_height(segmenter: OneShotSegmenter, ref_source: CropFeatures, pseudo: np.ndarray,
                        registered: tuple[np.ndarray, np.ndarray], tgt_stack: SliceStack, values: Sequence[int],
                        params: PropagationParams, progress: ProgressCallback | None,
                        batch_size: int) -> np.ndarray:
    """Label every target slice that the registered reference labels reach from the reference slices at its height.

    pseudo: the reference's (K, J, I) self-propagated labels; registered: :func:`registered_reference` of them.
    Each slice's patches take the labels of their nearest patches (within ``params.transfer_neighbourhood``) in the
    reference slices within ``params.transfer_context_span`` of its height, gated with
    ``params.transfer_gate_sigma`` around the carried labels and blended with them
    (``params.transfer_registration_weight``), and weighed by the reference's grey values per class
    (``params.intensity_likelihood``, histograms of its pseudo-labelled crops). Both studies are cut around all
    their (carried) labelled slices, so that both are seen at the same scale. Returns the target's (K', J', I')
    int64 label map.
    """
    carried, heights = registered
    ref_stack, grid = ref_source.stack, ref_source.grid
    matches = matching_reference_slices(carried, heights, tgt_stack)
    priors = {n: tgt_stack.labels(carried, n) for n in range(len(tgt_stack))}
    present = [n for n, prior in priors.items() if prior.any()]
    tgt_box = region_of_interest([priors[n] for n in present], params.crop_scale, params.min_crop_fraction)
    tgt_source = CropFeatures(segmenter, tgt_stack, tgt_box, params, batch_size, ref_source.image_size)
    labelled_reference = labelled_slices(pseudo, ref_stack.axis)
    ref_box = region_of_interest([ref_stack.labels(pseudo, r) for r in labelled_reference], params.crop_scale,
                                 params.min_crop_fraction)
    ref_source = CropFeatures(segmenter, ref_stack, ref_box, params, batch_size, ref_source.image_size)
    contexts: dict[int, ContextSlice] = {}

    def context_at(height: int) -> list[ContextSlice]:
        span = params.transfer_context_span
        chosen = [r for r in labelled_reference if abs(r - height) <= span]
        chosen = chosen or [min(labelled_reference, key=lambda r: abs(r - height))]
        for r in chosen:
            if r not in contexts:
                lab = crop_square(ref_stack.labels(pseudo, r), ref_box)
                contexts[r] = ContextSlice(ref_source.features(r), patch_label_fractions(lab, values, grid))
        return [contexts[r] for r in chosen]

    allowed = neighbourhood_mask(grid, params.transfer_neighbourhood)
    slice_params = replace(params, registration_weight=params.transfer_registration_weight)
    histograms = None  # the reference's grey values per class weigh each target slice's decision
    if params.intensity_likelihood is not None:
        histograms = labelled_intensity_histograms(
            {r: crop_square(ref_stack.labels(pseudo, r), ref_box) for r in labelled_reference},
            lambda r: crop_square(ref_stack.image(r), ref_box)[..., 0], values)
    output = np.zeros(tgt_stack.volume.shape, dtype=np.int64)
    total = len(tgt_stack)
    for done, n in enumerate(range(total), start=1):
        if n in present:
            prior = crop_square(priors[n], tgt_box)
            carried_soft = torch.from_numpy(np.stack([prior == 0] + [prior == v for v in values]).astype(np.float32))
            likelihood = None
            if histograms is not None and params.intensity_likelihood is not None:
                likelihood = intensity_likelihood(histograms, tgt_source.image(n), params.intensity_likelihood)
            crop = label_slice(tgt_source.features(n), context_at(matches[n]), values, grid, tgt_box.side,
                               slice_params, allowed, prior=prior, gate_sigma=params.transfer_gate_sigma,
                               image=tgt_source.image(n), warped=carried_soft, likelihood=likelihood)
            take_slice(output, tgt_stack.axis, n)[...] = tgt_stack.to_native(paste_square(crop, tgt_box,
                                                                                           tgt_stack.model_shape))
        if progress is not None:
            progress(done, total)
    return output


@dataclass
class ReferenceChain:
    """What the volume mode's transfer needs of the reference study alone (:func:`reference_chain`)."""

    stack: SliceStack
    labels: np.ndarray
    """(K, J, I) the reference's given labels."""
    shots: list[int]
    values: list[int]
    box: SquareBox
    image_size: int
    pseudo: np.ndarray | None
    """(K, J, I) the given labels chained through the reference (None without ``transfer_self_propagation``)."""
    walk_weights: dict[int, float]
    """The walk's calibration on ``pseudo``'s labelled slices."""


def reference_chain(segmenter: OneShotSegmenter, ref_stack: SliceStack, reference_labels: np.ndarray,
                    shots: Sequence[int], params: PropagationParams, batch_size: int) -> ReferenceChain:
    """The reference's shots, crop, model input size and, with ``params.transfer_self_propagation``, its labels
    chained through itself (:func:`reference_self_propagation`) with the walk's calibration on them."""
    ref_model = {n: ref_stack.labels(reference_labels, n) for n in shots}
    values = sorted({int(v) for lab in ref_model.values() for v in np.unique(lab) if v > 0})
    # Every labelled slice, not only the shots, places the crop and anchors the reference's own chain: a fully
    # labelled reference keeps its labels, and the shots (spread from end to end) may hold only the tips.
    every = labelled_slices(reference_labels, ref_stack.axis)
    ref_box = region_of_interest([ref_stack.labels(reference_labels, n) for n in every], params.crop_scale,
                                 params.min_crop_fraction)
    size = model_input_size([crop_square(lab, ref_box) for lab in ref_model.values()], values,
                            segmenter.backbone.patch_size, params)
    pseudo, weights = None, {}
    if params.transfer_self_propagation:
        pseudo = reference_self_propagation(segmenter, ref_stack, reference_labels, every, params, batch_size)
        # the target has no labelled slice: its walk keeps the weights the reference's labelled slices gave
        weights = volume_walk_calibration(pseudo, ref_stack, every, params)
    return ReferenceChain(ref_stack, reference_labels, list(shots), values, ref_box, size, pseudo, weights)


def _transfer_volume_mode(segmenter: OneShotSegmenter, chain: ReferenceChain, tgt_stack: SliceStack,
                          params: PropagationParams, progress: ProgressCallback | None,
                          batch_size: int, registration_voxels: int | None) -> np.ndarray:
    """``mode="volume"`` of :func:`transfer_to_study` (the studies registered on grids of at most
    ``registration_voxels``).

    The shots were first chained through the reference study (:func:`reference_chain`); the whole
    (pseudo-)labelled reference is registered onto the target (:func:`registered_reference`), and each target slice
    the carried labels reach is labelled from the reference slices at its height, kept near the carried labels. If
    registration carries nothing, the target's slice that looks most like the shots is labelled and chained.
    """
    ref_stack, reference_labels, shots, values = chain.stack, chain.labels, chain.shots, chain.values
    ref_box, size = chain.box, chain.image_size
    ref_model = {n: ref_stack.labels(reference_labels, n) for n in shots}
    ref_source = CropFeatures(segmenter, ref_stack, ref_box, params, batch_size, size)
    grid = ref_source.grid
    if chain.pseudo is not None:
        registered = registered_reference(ref_stack, chain.pseudo, tgt_stack, params.transfer_deformable_iterations,
                                          registration_voxels)
        if registered is not None and registered[0].any():
            labelled = _transfer_by_height(segmenter, ref_source, chain.pseudo, registered, tgt_stack, values,
                                           params, progress, batch_size)
            return refine_volume_boundaries(labelled, tgt_stack, (), params, chain.walk_weights)
    context = [ContextSlice(ref_source.features(n), patch_label_fractions(crop_square(lab, ref_box), values, grid))
               for n, lab in ref_model.items()]
    first_index, prior = registered_first_slice(ref_stack, reference_labels, shots, tgt_stack,
                                                registration_voxels)
    tgt_box = region_of_interest([prior if prior.any() else ref_model[shots[0]]], params.crop_scale,
                                 params.min_crop_fraction)
    tgt_source = CropFeatures(segmenter, tgt_stack, tgt_box, params, batch_size, size)
    prior_crop = crop_square(prior, tgt_box)
    allowed = neighbourhood_mask(grid, params.transfer_neighbourhood)
    first_index = most_similar_slice(tgt_source, context, allowed, first_index, params.transfer_search)
    first = label_slice(tgt_source.features(first_index), context, values, grid, tgt_box.side, params, allowed,
                        prior=prior_crop, gate_sigma=params.transfer_gate_sigma, image=tgt_source.image(first_index))
    for value in values:  # a structure the features lost on the first slice keeps its registered place
        if not np.any(first == value):
            first[(prior_crop == value) & (first == 0)] = value
    total, done = len(tgt_stack), 0

    def step(index: int) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total), total)

    step(first_index)
    # Chained jointly, free to trade places inside their union: the first slice places them only roughly.
    chain_params = replace(params, independent_structures=False, gate_union=True)
    crops = propagate_crops({first_index: first}, tgt_source.features, values, grid, chain_params, start=0,
                            stop=total, images=tgt_source.image, progress=step)
    output = np.zeros(tgt_stack.volume.shape, dtype=np.int64)
    for n, crop in crops.items():
        take_slice(output, tgt_stack.axis, n)[...] = tgt_stack.to_native(paste_square(crop, tgt_box,
                                                                                       tgt_stack.model_shape))
    if progress is not None and done < total:
        progress(total, total)
    return refine_volume_boundaries(output, tgt_stack, (), params, {})  # no chained reference to calibrate on
