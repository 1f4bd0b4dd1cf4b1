"""Propagation of labelled slices through a volume with what a volume gives and a pair of photographs does not.

The published method (ALGORITHM.md) segments each slice on its own from the labelled shots. Here the slices of
one study are treated as a sequence, as video object segmentation treats frames:

- **Region of interest.** Every slice is cut to one square box around the labelled structures (physical aspect
  kept: slices come with square pixels), enlarged by ``crop_scale``, and that crop is what the backbone sees at
  ``image_size``, so a small structure covers many patches.
- **Chained label transfer.** From each labelled slice outwards, slice by slice, every target patch takes the
  soft labels of its ``top_k`` most similar patches (cosine of backbone features) among the context slices' patches
  within ``neighbourhood`` patches of its own position, weighted by ``softmax(similarity / temperature)``. The
  context is the labelled slice (always kept as a shot) and the last ``recent_slices`` predicted slices.
- **Tracked gate.** The labelled slice's labels are also carried outwards slice by slice by deformable
  registration (demons on the crops, :mod:`insid3_med.registration`), independently of the predictions; each
  structure's probability is damped away from where that track puts it (``gate_tracking``; otherwise away from
  the previous slice's prediction). Registration says where the structure moved, features say what it is: a
  prediction that drifted onto look-alike tissue is pulled back by the track.
- **Registration prior.** Optionally, the previous slice's labels are also carried onto the slice by deformable
  registration (demons, :mod:`insid3_med.registration`), and that warped label map is blended with the feature
  evidence (``registration_weight``): registration says where the structure moved, features say what it is.
- **Grey values of the labelled slice.** Each structure's and the background's grey-value histograms on the
  labelled slices weigh every slice's decision (``intensity_likelihood``), not the stop's confidence.
- **Stop.** A structure has ended where its predicted area falls below ``stop_ratio`` times its area on the
  labelled slice, or where the mean decision confidence over its predicted pixels falls below ``stop_confidence``
  times the highest such mean on the slices before it in that direction (a look-alike beyond its end is matched
  less surely than the structure was): it is removed from that slice and from every slice further out that way.
- **Boundaries in 3D.** ``random_walk_beta``: the voxels near the boundaries of the whole label map are decided
  again by a random walk on the grey values, with links across slices, calibrated so that the labelled slices'
  structures would keep their drawn areas (:mod:`insid3_med.refinement`).

Shapes: a crop is (S, S) pixels of the square-pixel slice; the backbone's patch grid is (g, g) with
g = image_size / patch; N = g * g patches, C feature channels, L structures (label values) plus background.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from insid3_med.backbones import Backbone
from insid3_med.engine import flatten_features
from insid3_med.predictor import normalise_for_backbone

if typing.TYPE_CHECKING:
    from insid3_med.registration import LabelWarp

FeatureSource = Callable[[int], torch.Tensor]
"""Slice index -> (N, C) L2-normalised patch features of that slice's crop."""

ImageSource = Callable[[int], np.ndarray]
"""Slice index -> (S, S) float32 grey crop of that slice, in [0, 1]."""


@dataclass(frozen=True)
class PropagationParams:
    """Settings of the volume propagation (see the module docstring); the defaults are the measured best.

    image_size: side in pixels of the crop fed to the backbone (a multiple of its patch size after rounding).
    max_image_size, patches_across: the side grows up to ``max_image_size`` until the thinnest labelled structure
        is ``patches_across`` patches thick (:func:`model_input_size`); equal sizes fix it.
    crop_scale: crop side = this times the larger side of the labelled structures' bounding box. 1.5 since
        2026-11-27 (was 2): ACDC 0.834 -> 0.838, BraTS 0.869 -> 0.885, hippocampus 0.780 -> 0.780 on every volume.
    crop_ensemble: crop scales of an ensemble (empty: none, one chain with ``crop_scale``): the volume mode runs one
        chain per scale and each voxel takes the label a strict majority of them give (else background); about
        ``len`` times the time. Measured with 1.25, 1.5, 1.75 (harness, every volume): hippocampus 0.780 -> 0.788
        (FP slices 2.2% -> 1.4%), ACDC 0.838 -> 0.842, BraTS 0.885 -> 0.883; see reports/RESULTS.md. In a transfer it
        applies to the reference's own chain only (measured with its former settings: hippocampus from one slice
        0.596 -> 0.596).
    min_crop_fraction: the crop side is at least this fraction of the slice's larger side.
    top_k, temperature, neighbourhood (patches, Chebyshev radius): the label transfer.
    recent_slices: predicted slices kept as context beside the labelled slice(s).
    stop_ratio: a structure ends where its area falls below this fraction of its labelled area.
    stop_confidence: a structure also ends where the mean decision confidence over its predicted pixels falls below
        this fraction of the highest such mean on the slices before it in that direction (None: area rule only).
        Measured on every volume (one structure per episode, largest slice labelled, DINOv2 stand-in, gate on the
        previous slice): 0.85 took the FP slices beyond the extent from 5.8% to 1.2% on hippocampus (Dice 0.757 ->
        0.767), 46% -> 41% on ACDC (Dice 0.837 -> 0.833), BraTS unchanged (0.863, 0.2%); 0.8 / 0.9 cut fewer / more
        true slices. The tracked gate lets a structure run on further, so it comes with 0.875. Cutting on an
        absolute cosine similarity to the labelled slice instead halves ACDC's FP slices but costs 0.02-0.1 Dice.
    registration_weight: weight of the demons-warped previous labels against the feature evidence (0: features only).
    flip: average the features of each crop with those of its left-right mirror image (test-time flip).
    gate_sigma: a structure's probability is multiplied by exp(-d^2 / 2 sigma^2) at distance d outside its mask on
        the gate's centre (the track, or the previous slice); sigma is this fraction of the crop side (None: no gate).
    gate_tracking: centre the gate on the labelled slice's labels carried slice by slice by demons registration of
        the crops (:func:`tracked_gate_centre`), not on the previous slice's prediction. Measured (harness, every
        volume, with gate_sigma 0.02 and stop_confidence 0.875 against the former 0.03 / 0.85 without it):
        hippocampus 0.767 -> 0.780 (posterior 0.725 -> 0.760; FP slices 1.2% -> 2.5%), ACDC 0.833 -> 0.834,
        BraTS 0.863 -> 0.868.
    registration_size: the tracked gate and the registration blend register each pair of crops (at the volume's
        own pixel size) averaged down by an integer factor to about this side in pixels (round(side / this), at
        least 1; None: never averaged). Measured: 112 leaves ACDC (150 px crops), hippocampus (about 40 px) and
        BraTS (140-210 px) where they were (0.834 / 0.785 on 20 volumes / 0.869) and makes a BraTS volume 1.6 to
        1.7x faster; 64 costs BraTS 0.021.
    refine_band, refine_strength: boundary refinement with the slice's grey values within this fraction of the crop
        side from the boundaries (None: none); see :func:`refine_with_intensity`.
    gate_union: with several structures chained together, each may take any place inside the union of the previous
        slice's structures (not only near its own mask). Measured (harness, every structure drawn on the slice of
        largest union, every volume): hippocampus 0.618 -> 0.695 (its head and body are one tissue, and the body
        grows where the head was), ACDC 0.851 -> 0.828 (its structures keep their places): off by default.
    gate_union_one_tissue: without ``gate_union``, the structures that look like parts of one tissue on the
        labelled slices (:func:`one_tissue_partners`: they touch, and their grey-value histograms overlap) may each
        take any place inside their previous masks' union; the others keep to their own places. Measured (harness,
        every structure drawn on the slice of largest union, every volume): the hippocampus's head and body are such
        a pair on 97 of 100 volumes, and it went as with ``gate_union`` (reports/RESULTS.md); ACDC has no pair on any
        volume (its ventricles do not touch, and each differs in grey from the myocardium it touches): unchanged.
        A transfer's reference chain uses ``transfer_reference_gate_union`` in place of ``gate_union``.
    split_one_tissue_parts: after the chain, the pixels of two parts of one tissue (:func:`one_tissue_partners` on
        the labelled slices) are split between them by the straight boundary drawn between them on the nearest
        labelled slice holding both (:func:`straight_part_boundary`), extended across the slices; their union stays
        as the chain found it. Their features cannot tell the parts apart, and the chain's boundary drifts: the
        head took the body's place past the head's end. Measured (harness, every structure drawn on the slice of
        largest union, every volume): see reports/RESULTS.md. Applies before the 3D walk, to every chain including a
        transfer's reference chain.
    split_parts_in_chain: with ``split_one_tissue_parts``, each chained slice is split that way too, by the line of
        the nearest chain anchor that draws one for the pair, before it serves as the next slice's gate and
        context, while both parts are still chained. A part drawn small on the labelled slice then grows where the
        tissue crosses the line, instead of being outvoted by its partner and dying out. Measured (harness, every
        structure drawn on the slice of largest union, every volume): hippocampus 0.7845 -> 0.7981 (reports/RESULTS.md).
    area_calibration: weigh each structure so that the patch-grid round trip keeps its area on the labelled slice
        (:func:`area_preserving_weights`); helps structures thinner than a patch, hurts others (measured: off).
    crop_handoffs, handoff_margin: where several structures are drawn on one slice and chained together, a
        structure whose predicted mask comes within ``handoff_margin`` of the crop's side (a fraction of it) on a
        side that lies inside the slice is followed further: its chain goes on alone from that slice in a crop of
        the same side re-centred on it (the labelled slice kept in its context), at most ``crop_handoffs`` times
        per structure and direction (0: never). A structure labelled alone keeps the fixed crop, whose edge ends a
        chain that slides along a neighbouring look-alike. Measured (harness, 20 hippocampus volumes): every
        structure drawn on the slice of largest union, with ``gate_union``, 0.701 -> 0.738 (posterior 0.597 ->
        0.671; its body and tail leave the crop around the head, 21% of its voxels lie outside it); labelled
        alone, the same rule would cost 0.814 -> 0.798 (the anterior part runs on along the posterior part,
        FP slices 13 -> 51), hence multi-structure chains only.
    independent_structures: chain each structure on its own, the others as background, and merge by confidence
        (measured: a joint chain did better on ACDC's three structures, 0.814 against 0.780 mean Dice).
    transfer_gate_sigma, transfer_neighbourhood: the gate and neighbourhood that place a reference study's labels on
        the target's first slice (looser than between adjacent slices: two studies differ more).
    transfer_search: the target's first slice is the one, within this many slices of where registration puts the
        reference slice, that looks most like it (used where registration carries nothing).
    transfer_self_propagation: chain the reference's labelled slices through the reference study first, register
        the whole pseudo-labelled reference onto the target, and label each target slice the carried labels reach
        from the reference slices at its height (False: only the shots, one registered first slice, then a chain).
    transfer_deformable_iterations: 3D demons iterations after the affine registration of the two studies (0: none).
    transfer_registration_voxels: the two studies are registered on grids of at most this many voxels, larger ones
        averaged over bins of voxels first (None: at full resolution, which takes most of an hour for two CTs).
    frames_registration_voxels: the same between two frames of one subject (a cine's phases: the heart moves, the
        scanner's frame stays), where a coarser grid registers as well, measured on ACDC (``--all-frames``, the
        bundle's other frames of its reference, the harness's ``frames`` pairing).
    transfer_context_span: a target slice is labelled from the reference slices within this many of its height.
    transfer_registration_weight: weight of the carried reference labels against the feature evidence there.
    fill_between_labelled: between two slices labelled with a structure, the voxels the chain leaves to the
        background take the structure where shape-based interpolation of the two labelled slices puts it
        (:func:`insid3_med.interpolation.interpolate_between_slices`). Measured (harness, every volume, each
        structure on 2 / 3 / 5 slices spread over its extent): hippocampus 0.805 / 0.844 / 0.899 -> 0.824 / 0.873
        / 0.929 (the interpolation alone 0.550 / 0.767 / 0.903); ACDC with 3 slices 0.905 -> 0.907. One labelled
        slice per structure: no change.
    random_walk_beta, random_walk_band: after the chain (and the crop ensemble's vote), the voxels within
        ``random_walk_band`` pixels of a boundary, in the slice plane, are decided again by a 3D random walk on the
        volume's grey values with edge sharpness ``random_walk_beta`` (:mod:`insid3_med.refinement`; None: not
        run), calibrated on the labelled slices, which stay as drawn. In a transfer it refines the reference's own
        chain and the target's labels (with the reference's calibration). Measured with beta 130 and band 1
        (harness, largest slice labelled, every volume): hippocampus 0.780 -> 0.794 (184 of 200 episodes
        better), BraTS 0.885 -> 0.890, ACDC 0.838 -> 0.839 (uncalibrated: 0.792, 0.887, 0.828); transfers from
        one slice (50 pairs): hippocampus 0.612 -> 0.627, ACDC 0.407 -> 0.405. The default since 2026-11-27.
    intensity_likelihood: each slice's decision is also weighed by how likely each pixel's grey value is under each
        class's grey-value histogram on the labelled slices (background included), raised to this power (None:
        not used). The stop's confidence stays the features' own. A chain that slides off a thin structure onto
        brighter or darker tissue is pulled back. Measured with 0.2 (harness, largest slice labelled, every volume,
        with the walk): hippocampus 0.794 -> 0.804 (posterior 0.768 -> 0.790; 134 of 200 episodes better),
        BraTS 0.890 -> 0.895, ACDC 0.839 -> 0.839. On 20 hippocampus volumes 0.1 / 0.2 / 0.3 / 0.5 gave 0.812 /
        0.814 / 0.813 / 0.809 (none: 0.807). The default since 2026-11-27. In a transfer it weighs the reference's
        own chain, and each target slice by the reference's pseudo-labelled grey values: hippocampus from one slice
        (50 pairs) 0.627 -> 0.642, each part on its own slice 0.713 -> 0.732.
    transfer_reference_gate_tracking, transfer_reference_gate_sigma, transfer_reference_stop_confidence,
    transfer_reference_gate_union: the chain through the reference study (``transfer_self_propagation``) uses these
        in place of ``gate_tracking``, ``gate_sigma``, ``stop_confidence`` and ``gate_union``: the within-study
        gate and stop, and structures drawn on one slice free to trade places inside their union. Measured (harness,
        50 seeded pairs, against the former gate on the previous slice with sigma 0.03, a stop at 0.85 and no union
        gate): hippocampus from one slice 0.596 -> 0.612, each part on its own slice 0.651 -> 0.699, a whole
        labelled reference unchanged; ACDC from one slice 0.423 -> 0.407. The within-study gate and stop alone gave
        0.557 on the hippocampus from one slice, the union gate alone 0.576. Since the one-tissue rule
        (``gate_union_one_tissue``) the union gate is off there too: ACDC from one slice 0.412 -> 0.426 (32 pairs
        better, 15 worse), the hippocampus the same on 48 of 50 pairs (its parts are one tissue on 97% of volumes).
    """

    image_size: int = 224
    max_image_size: int = 336
    patches_across: float = 2.0
    crop_scale: float = 1.5
    crop_ensemble: tuple[float, ...] = ()
    min_crop_fraction: float = 0.0
    top_k: int = 10
    temperature: float = 0.05
    neighbourhood: int = 3
    recent_slices: int = 2
    stop_ratio: float = 0.1
    stop_confidence: float | None = 0.875
    registration_weight: float = 0.0
    flip: bool = False
    gate_sigma: float | None = 0.02
    gate_tracking: bool = True
    registration_size: int | None = 112
    refine_band: float | None = 0.02
    refine_strength: float = 1.0
    gate_union: bool = False
    gate_union_one_tissue: bool = True
    split_one_tissue_parts: bool = True
    split_parts_in_chain: bool = True
    area_calibration: bool = False
    independent_structures: bool = False
    crop_handoffs: int = 3
    handoff_margin: float = 0.06
    transfer_gate_sigma: float | None = 0.1
    transfer_neighbourhood: int = 5
    transfer_search: int = 3
    transfer_self_propagation: bool = True
    transfer_deformable_iterations: int = 50
    transfer_registration_voxels: int | None = 2**20  # insid3_med.registration.STUDY_REGISTRATION_VOXELS
    frames_registration_voxels: int | None = 2**18
    transfer_context_span: int = 2
    transfer_registration_weight: float = 0.3
    transfer_reference_gate_tracking: bool = True
    transfer_reference_gate_sigma: float | None = 0.02
    transfer_reference_stop_confidence: float | None = 0.875
    transfer_reference_gate_union: bool = False
    fill_between_labelled: bool = True
    random_walk_beta: float | None = 130.0
    random_walk_band: int = 1
    intensity_likelihood: float | None = 0.2

    def __post_init__(self) -> None:
        if self.image_size < 14:
            raise ValueError(f"image_size must be at least one patch, not {self.image_size}")
        if self.crop_scale < 1.0:
            raise ValueError(f"crop_scale must be >= 1, not {self.crop_scale}")
        if any(not scale >= 1.0 for scale in self.crop_ensemble):
            raise ValueError(f"every crop_ensemble scale must be >= 1, not {self.crop_ensemble}")
        if self.top_k < 1 or self.recent_slices < 0 or self.neighbourhood < 0:
            raise ValueError("top_k must be >= 1, recent_slices and neighbourhood >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {self.temperature}")
        for name in ("registration_weight", "transfer_registration_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if self.transfer_context_span < 0 or self.transfer_deformable_iterations < 0:
            raise ValueError("transfer_context_span and transfer_deformable_iterations must be >= 0")
        for name in ("transfer_registration_voxels", "frames_registration_voxels"):
            if getattr(self, name) is not None and getattr(self, name) < 4096:
                raise ValueError(f"{name} must be at least 4096 or None, not {getattr(self, name)}")
        if self.registration_size is not None and self.registration_size < 16:
            raise ValueError(f"registration_size must be at least 16 pixels or None, not {self.registration_size}")
        if not 0.0 <= self.stop_ratio < 1.0:
            raise ValueError(f"stop_ratio must be in [0, 1), not {self.stop_ratio}")
        for name in ("stop_confidence", "transfer_reference_stop_confidence"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] or None, not {value}")
        if self.random_walk_beta is not None and not self.random_walk_beta > 0:
            raise ValueError(f"random_walk_beta must be > 0 or None, not {self.random_walk_beta}")
        if self.intensity_likelihood is not None and not self.intensity_likelihood > 0:
            raise ValueError(f"intensity_likelihood must be > 0 or None, not {self.intensity_likelihood}")
        if self.crop_handoffs < 0:
            raise ValueError(f"crop_handoffs must be >= 0, not {self.crop_handoffs}")
        if not 0.0 < self.handoff_margin < 0.5:
            raise ValueError(f"handoff_margin must be in (0, 0.5), not {self.handoff_margin}")
        if self.random_walk_band < 1:
            raise ValueError(f"random_walk_band must be at least 1 pixel, not {self.random_walk_band}")
        for name in ("gate_sigma", "transfer_gate_sigma", "transfer_reference_gate_sigma", "refine_band"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, not {value}")
        if self.max_image_size < self.image_size:
            raise ValueError(f"max_image_size must be >= image_size ({self.image_size}), not {self.max_image_size}")
        if not self.patches_across > 0 or not self.refine_strength >= 0:
            raise ValueError("patches_across must be > 0 and refine_strength >= 0")
        if not 0.0 <= self.min_crop_fraction <= 1.0:
            raise ValueError(f"min_crop_fraction must be in [0, 1], not {self.min_crop_fraction}")
        if self.transfer_neighbourhood < 0 or self.transfer_search < 0:
            raise ValueError("transfer_neighbourhood and transfer_search must be >= 0")


def with_overrides(params: PropagationParams, overrides: Iterable[str]) -> PropagationParams:
    """``params`` with ``KEY=VALUE`` settings as typed on a command line (``gate_sigma=0.05``, ``flip=true``,
    ``stop_confidence=none``): each value is read as its field's type; an unknown key or a value of the wrong type
    raises a ValueError naming it and the choices."""
    hints = typing.get_type_hints(PropagationParams)
    names = [f.name for f in fields(PropagationParams)]
    changes: dict[str, typing.Any] = {}  # each value of its field's type (_setting_value)
    for item in overrides:
        key, sep, text = item.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or not key:
            raise ValueError(f"propagation setting {item!r}: expected KEY=VALUE (keys: {', '.join(names)})")
        if key not in names:
            raise ValueError(f"unknown propagation setting {key!r}; choose from {', '.join(names)}")
        changes[key] = _setting_value(key, text, hints[key])
    return replace(params, **changes)


def params_from_settings(settings: Mapping[str, object] | None) -> PropagationParams:
    """:class:`PropagationParams` from a {field: value} mapping (a config file's), checked as :func:`with_overrides`
    checks command-line text (None or empty: the defaults)."""
    return with_overrides(PropagationParams(), [f"{key}={value}" for key, value in (settings or {}).items()])


def _setting_value(key: str, text: str, hint: object) -> object:
    if typing.get_origin(hint) is tuple:  # crop_ensemble=1.25,1.5,1.75 or [1.25, 1.5, 1.75] (a config file); none: ()
        if text.lower() in ("none", "null"):
            return ()
        items = [item.strip() for item in text.strip("[]() ").split(",") if item.strip()]
        try:
            return tuple(float(item) for item in items)
        except ValueError:
            raise ValueError(f"propagation setting {key}={text!r}: expected comma-separated numbers") from None
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if text.lower() in ("none", "null"):
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"propagation setting {key} cannot be none")
    kind = options[0]
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes", "on")
        return kind(text)
    except ValueError:
        raise ValueError(f"propagation setting {key}={text!r}: expected {getattr(kind, '__name__', kind)}"
                         + (" or none" if len(typing.get_args(hint)) > 1 else "")) from None


# ------------------------------------------------------------------------------------------------------------
# region of interest
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SquareBox:
    """A square region of a slice: top-left corner (row, column) and side, in pixels; may reach past the edges."""

    top: int
    left: int
    side: int


def region_of_interest(masks: Sequence[np.ndarray], crop_scale: float, min_fraction: float = 0.0) -> SquareBox:
    """The square box centred on the bounding box of every mask's foreground, ``crop_scale`` times its larger side.

    masks: (H, W) arrays on one slice grid (non-zero = structure). The side is at least ``min_fraction`` of the
    slice's larger side and at least 8 pixels.
    """
    if not masks:
        raise ValueError("region_of_interest needs at least one mask")
    union = np.zeros(masks[0].shape, dtype=bool)
    for mask in masks:
        union |= np.asarray(mask) != 0
    rows, cols = np.nonzero(union)
    if rows.size == 0:
        raise ValueError("region_of_interest: every mask is empty")
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    side = max(8, int(math.ceil(crop_scale * max(height, width))), int(math.ceil(min_fraction * max(union.shape))))
    return square_box_around(union, side)


def square_box_around(mask: np.ndarray, side: int) -> SquareBox:
    """The square box of ``side`` pixels centred on the bounding box of the (H, W) ``mask``'s foreground (which
    must hold some)."""
    rows, cols = np.nonzero(mask)
    centre_row = (rows.min() + rows.max() + 1) / 2.0
    centre_col = (cols.min() + cols.max() + 1) / 2.0
    return SquareBox(int(round(centre_row - side / 2.0)), int(round(centre_col - side / 2.0)), side)


def crop_square(array: np.ndarray, box: SquareBox) -> np.ndarray:
    """(H, W, ...) -> (side, side, ...) cut of ``array`` at ``box``, zero where the box leaves the array."""
    out = np.zeros((box.side, box.side, *array.shape[2:]), dtype=array.dtype)
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, array.shape[0]), min(box.left + box.side, array.shape[1])
    if bottom > top and right > left:
        out[top - box.top : bottom - box.top, left - box.left : right - box.left] = array[top:bottom, left:right]
    return out


def paste_square(crop: np.ndarray, box: SquareBox, shape: tuple[int, int]) -> np.ndarray:
    """(side, side) crop -> (H, W) array of ``shape``, zero outside the box (the inverse of :func:`crop_square`)."""
    out = np.zeros(shape, dtype=crop.dtype)
    top, left = max(box.top, 0), max(box.left, 0)
    bottom, right = min(box.top + box.side, shape[0]), min(box.left + box.side, shape[1])
    if bottom > top and right > left:
        out[top:bottom, left:right] = crop[top - box.top : bottom - box.top, left - box.left : right - box.left]
    return out


# ------------------------------------------------------------------------------------------------------------
# features of crops
# ------------------------------------------------------------------------------------------------------------


def structure_thickness(labels: np.ndarray, values: Sequence[int]) -> float:
    """The thinnest structure's thickness in pixels: twice its largest inscribed radius (min over ``values``
    present in the (S, S) ``labels``); inf if none is present."""
    from scipy.ndimage import distance_transform_edt

    thickness = np.inf
    for value in values:
        mask = labels == value
        if mask.any():
            thickness = min(thickness, 2.0 * float(distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].max()))
    return thickness


def model_input_size(crops: Sequence[np.ndarray], values: Sequence[int], patch: int, params: PropagationParams) -> int:
    """The crop's side at the backbone: ``params.image_size``, raised (up to ``params.max_image_size``) until the
    thinnest labelled structure spans ``params.patches_across`` patches. crops: the labelled (S, S) label maps."""
    thickness = min(structure_thickness(crop, values) for crop in crops)
    side = crops[0].shape[0]
    wanted = params.image_size
    if np.isfinite(thickness) and thickness > 0:
        wanted = max(wanted, int(math.ceil(params.patches_across * patch * side / thickness)))
    size = min(max(params.image_size, params.max_image_size), wanted)
    return max(patch, int(math.ceil(size / patch)) * patch)


def patch_side(backbone: Backbone, image_size: int) -> int:
    """``image_size`` rounded to a multiple of the backbone's patch size (at least one patch)."""
    patch = backbone.patch_size
    return max(patch, int(round(image_size / patch)) * patch)


@torch.inference_mode()
def encode_crops(backbone: Backbone, crops: Sequence[np.ndarray], image_size: int, flip: bool = False,
                 batch_size: int = 8) -> list[torch.Tensor]:
    """(S, S, 3) float [0, 1] crops -> a list of (N, C) L2-normalised plain patch features at ``image_size``.

    flip: also encode each crop mirrored left-right, mirror its feature map back, and average the two.
    """
    side = patch_side(backbone, image_size)
    tensors = []
    for crop in crops:
        tensor = torch.from_numpy(np.ascontiguousarray(np.asarray(crop, dtype=np.float32).transpose(2, 0, 1)))[None]
        tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        tensors.append(tensor[0])
    batch = normalise_for_backbone(torch.stack(tensors))
    maps = backbone.encode(batch, batch_size=batch_size)
    if flip:
        mirrored = backbone.encode(batch.flip(-1), batch_size=batch_size).flip(-1)
        maps = F.normalize(maps, dim=1) + F.normalize(mirrored, dim=1)
    # The chain's arithmetic (N x M similarities, gates, refinement) is small and runs on the CPU beside its
    # numpy label maps, whatever device the backbone runs on.
    return [flatten_features(feature_map).cpu() for feature_map in maps.float()]


# ------------------------------------------------------------------------------------------------------------
# label transfer between slices
# ------------------------------------------------------------------------------------------------------------


def patch_label_fractions(labels: np.ndarray, values: Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
    """(S, S) label map -> (N, L + 1) share of each patch's area per class (column 0: background)."""
    labels_t = torch.from_numpy(np.ascontiguousarray(labels)).long()
    onehot = torch.stack([labels_t == 0] + [labels_t == v for v in values]).float()[None]  # (1, L+1, S, S)
    fractions = F.adaptive_avg_pool2d(onehot, grid) if onehot.shape[-1] >= grid[1] else F.interpolate(
        onehot, size=grid, mode="bilinear", align_corners=False)
    fractions = fractions[0].flatten(1).transpose(0, 1)
    return fractions / fractions.sum(dim=1, keepdim=True).clamp_min(1e-6)


def neighbourhood_mask(grid: tuple[int, int], radius: int) -> torch.Tensor:
    """(N, N) bool: patch pairs within ``radius`` patches of each other (Chebyshev distance)."""
    rows = torch.arange(grid[0]).repeat_interleave(grid[1])
    cols = torch.arange(grid[1]).repeat(grid[0])
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def transfer_labels(target: torch.Tensor, context: Sequence[torch.Tensor], context_labels: Sequence[torch.Tensor],
                    allowed: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Soft labels of the target's patches from their nearest context patches.

    target: (N, C); context[i]: (N, C) features of context slice i, context_labels[i]: its (N, L + 1) soft labels;
    allowed: (N, N) bool, which context positions a target patch may match. Returns (N, L + 1) probabilities.
    """
    features = torch.cat(list(context))  # (M, C)
    labels = torch.cat(list(context_labels))  # (M, L+1)
    similarity = target @ features.transpose(0, 1)  # (N, M)
    similarity = similarity.masked_fill(~allowed.repeat(1, len(context)), -torch.inf)
    values, index = similarity.topk(min(top_k, similarity.shape[1]), dim=1)
    weights = torch.softmax(values / temperature, dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)
    return (weights[..., None] * labels[index]).sum(dim=1)


def spatial_gate(labels: np.ndarray | torch.Tensor, values: Sequence[int], sigma: float) -> torch.Tensor:
    """(S, S) labels (or (L + 1, S, S) soft labels) -> (L + 1, S, S) gate: 1 on a structure, exp(-d^2 / 2 sigma^2) at
    distance d pixels outside it; the background's gate is 1 everywhere."""
    from scipy.ndimage import distance_transform_edt

    if isinstance(labels, torch.Tensor):
        masks = [labels[i + 1].numpy() >= 0.5 for i in range(len(values))]
        shape = tuple(labels.shape[1:])
    else:
        masks = [labels == v for v in values]
        shape = labels.shape
    gates = [np.ones(shape, dtype=np.float32)]
    for mask in masks:
        if not mask.any():
            gates.append(np.zeros(shape, dtype=np.float32))
            continue
        distance = distance_transform_edt(~mask)
        gates.append(np.exp(-0.5 * (distance / max(sigma, 1e-3)) ** 2).astype(np.float32))
    return torch.from_numpy(np.stack(gates))


def refine_with_intensity(probabilities: torch.Tensor, image: np.ndarray, band: float, strength: float = 1.0,
                          bins: int = 32) -> torch.Tensor:
    """Sharpen class boundaries with the slice's grey values (a local intensity model per class).

    probabilities: (L + 1, S, S); image: (S, S) grey in [0, 1]. Each class's grey-value histogram is taken over the
    pixels within ``2 * band`` of the boundaries of the most probable labels, each pixel weighted by the class's
    probability there; within ``band`` pixels of a boundary the probabilities are multiplied by those histograms'
    likelihoods (raised to ``strength``). Returns (L + 1, S, S) probabilities, renormalised.
    """
    from scipy.ndimage import distance_transform_edt

    hard = probabilities.max(dim=0).indices.numpy()  # as argmax (first maximum), 10x faster over dim 0 on CPU
    edges = np.zeros(hard.shape, dtype=bool)
    edges[:-1] |= hard[:-1] != hard[1:]
    edges[1:] |= hard[:-1] != hard[1:]
    edges[:, :-1] |= hard[:, :-1] != hard[:, 1:]
    edges[:, 1:] |= hard[:, :-1] != hard[:, 1:]
    if not edges.any():
        return probabilities
    distance = distance_transform_edt(~edges)
    near, region = distance <= band, distance <= 2.0 * band
    index = grey_value_bins(image, bins)
    weights = probabilities.numpy()[:, region]  # (L+1, R)
    histograms = np.stack([np.bincount(index[region], weights=w, minlength=bins) for w in weights]) + 1e-3
    histograms = gaussian_smooth_rows(histograms / histograms.sum(axis=1, keepdims=True), 1.0)
    likelihood = torch.from_numpy(histograms[:, index].astype(np.float32)) ** strength  # (L+1, S, S)
    posterior = probabilities * likelihood
    posterior = posterior / posterior.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.where(torch.from_numpy(near)[None], posterior, probabilities)


def grey_value_bins(image: np.ndarray, bins: int) -> np.ndarray:
    """An (S, S) grey crop in [0, 1] -> (S, S) int64 index of its histogram bin among ``bins`` equal bins."""
    return np.clip((np.asarray(image) * bins).astype(np.int64), 0, bins - 1)


def gaussian_smooth_rows(rows: np.ndarray, sigma: float) -> np.ndarray:
    """(R, B) histograms smoothed along B with a Gaussian of ``sigma`` bins (edges reflected)."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(rows, sigma, axis=1, mode="nearest")


def area_preserving_weights(labels: np.ndarray, values: Sequence[int], grid: tuple[int, int],
                            low: float = 0.1) -> torch.Tensor:
    """(L + 1,) class weights that make the patch-grid round trip keep each structure's area on a labelled slice.

    A structure thinner than a patch loses area when its patch shares are upsampled and thresholded at 0.5; the
    threshold t that keeps its area on the labelled (S, S) slice (searched in [``low``, 0.5]) becomes the weight
    (1 - t) / t on its probability (background: 1), so that ``argmax`` then thresholds it at t.
    """
    side = labels.shape[0]
    pixels = upsample_probabilities(patch_label_fractions(labels, values, grid), grid, side)
    weights = torch.ones(len(values) + 1)
    for i, value in enumerate(values):
        area = int(np.count_nonzero(labels == value))
        if area == 0:
            continue
        ordered = torch.sort(pixels[i + 1].flatten(), descending=True).values
        threshold = float(ordered[min(area, ordered.numel()) - 1])
        threshold = min(0.5, max(low, threshold))
        weights[i + 1] = (1.0 - threshold) / threshold
    return weights


def upsample_probabilities(probabilities: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """(N, L + 1) patch probabilities -> (L + 1, side, side) pixel probabilities (bilinear)."""
    maps = probabilities.transpose(0, 1).reshape(1, -1, *grid)
    return F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)[0]


# ------------------------------------------------------------------------------------------------------------
# the chain
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ContextSlice:
    """A slice the labels are taken from: (N, C) patch features and (N, L + 1) soft patch labels."""

    features: torch.Tensor
    labels: torch.Tensor


def label_slice(target: torch.Tensor, context: Sequence[ContextSlice], values: Sequence[int], grid: tuple[int, int],
                side: int, params: PropagationParams, allowed: torch.Tensor, *, prior: np.ndarray | None = None,
                gate_sigma: float | None = None, image: np.ndarray | None = None,
                warped: torch.Tensor | None = None, active: Sequence[int] | None = None,
                class_weights: torch.Tensor | None = None, confidence: list[np.ndarray] | None = None,
                likelihood: torch.Tensor | None = None, partners: np.ndarray | None = None) -> np.ndarray:
    """One slice's (S, S) int64 label map from its (N, C) features and the context slices.

    prior: the (S, S) labels it should stay near (the previous slice's), gated with ``gate_sigma`` (a fraction of
    the side; default ``params.gate_sigma``); image: its (S, S) grey crop (for the refinement); warped: (L + 1, S, S)
    registration-carried labels (blended with ``params.registration_weight``); active: the label values still
    allowed (default: all); class_weights: (L + 1,) multipliers of the probabilities before the decision
    (:func:`area_preserving_weights`); confidence: if given, the (S, S) probability of each pixel's decision is
    appended to it; likelihood: (L + 1, S, S) multipliers of the decision only (:func:`intensity_likelihood`): the
    confidence stays the features' own, so that the stop does not change with it; partners: (L, L) bool, the
    structures that may take places inside each other's gated masks (:func:`one_tissue_partners`; with
    ``params.gate_union`` every structure is every other's partner).
    """
    probabilities = transfer_labels(target, [c.features for c in context], [c.labels for c in context], allowed,
                                    params.top_k, params.temperature)
    pixels = upsample_probabilities(probabilities, grid, side)  # (L+1, S, S)
    if warped is not None and params.registration_weight > 0:
        pixels = (1.0 - params.registration_weight) * pixels + params.registration_weight * warped
    sigma = params.gate_sigma if gate_sigma is None else gate_sigma
    if prior is not None and sigma is not None:
        gate = spatial_gate(prior, values, sigma * side)
        if params.gate_union:  # every structure is every other's partner
            partners = np.ones((len(values), len(values)), dtype=bool)
        if partners is not None:  # a structure may take any place inside its partners' and its previous union
            unions: dict[tuple[int, ...], torch.Tensor] = {}
            for i in range(len(values)):
                group = tuple(values[j] for j in range(len(values)) if partners[i, j] or i == j)
                if len(group) > 1:
                    if group not in unions:
                        unions[group] = spatial_gate(np.isin(prior, group).astype(np.int64), [1], sigma * side)[1]
                    gate[i + 1] = torch.maximum(gate[i + 1], unions[group])
        pixels = pixels * gate
    if params.refine_band is not None and image is not None:
        pixels = pixels / pixels.sum(dim=0, keepdim=True).clamp_min(1e-12)
        pixels = refine_with_intensity(pixels, image, params.refine_band * side, params.refine_strength)
    if class_weights is not None:
        pixels = pixels * class_weights[:, None, None]
    if active is not None:
        inactive = [i + 1 for i, v in enumerate(values) if v not in active]
        if inactive:
            pixels[inactive] = -1.0
    decision = pixels if likelihood is None else torch.where(pixels < 0, pixels, pixels * likelihood)
    labels = most_probable_labels(decision, values)
    if confidence is not None:
        positive = pixels.clamp_min(0)
        confidence.append((positive.max(dim=0).values / positive.sum(dim=0).clamp_min(1e-12)).numpy())
    return labels


def labelled_intensity_histograms(anchors: Mapping[int, np.ndarray], images: ImageSource, values: Sequence[int],
                                  bins: int = 32) -> np.ndarray:
    """(L + 1, bins) grey-value histograms (each summing to 1) of the background and of each structure on the
    labelled crops ``anchors`` (slice index -> (S, S) labels; ``images`` gives their (S, S) grey crops in [0, 1]),
    smoothed over a bin."""
    counts = np.zeros((len(values) + 1, bins))
    for n, labels in anchors.items():
        index = grey_value_bins(images(n), bins)
        labels = np.asarray(labels)
        for i, value in enumerate([0, *values]):
            counts[i] += np.bincount(index[labels == value], minlength=bins)
    counts = gaussian_smooth_rows(counts + 1e-3, 1.0) + 1e-3
    return counts / counts.sum(axis=1, keepdims=True)


def intensity_likelihood(histograms: np.ndarray, image: np.ndarray, power: float) -> torch.Tensor:
    """(L + 1, bins) histograms of :func:`labelled_intensity_histograms` and an (S, S) grey crop in [0, 1] ->
    (L + 1, S, S) likelihood of each class at each pixel, raised to ``power``."""
    bins = histograms.shape[1]
    index = grey_value_bins(image, bins)
    return torch.from_numpy(histograms[:, index].astype(np.float32)) ** power


def one_tissue_partners(anchors: Mapping[int, np.ndarray], images: ImageSource, values: Sequence[int],
                        min_contact: float = 0.3, min_overlap: float = 0.4, bins: int = 32) -> np.ndarray:
    """(L, L) bool: which pairs of structures look like parts of one tissue on the labelled crops ``anchors``
    (slice index -> (S, S) labels; ``images`` gives their (S, S) grey crops in [0, 1]). A pair qualifies where, on
    some labelled slice holding both, they touch (pixels of one beside the other, over the square root of the
    smaller one's area, above ``min_contact``) and on some such slice their grey-value histograms overlap (sum of
    the bin-wise minimum of the normalised histograms above ``min_overlap``). The thresholds lie between the
    shared sets' pairs on the slice of largest union (first 30 volumes each): the hippocampus's head and body touch
    at 0.63 or more and overlap at a median 0.75; ACDC's ventricles never touch, and each overlaps the myocardium
    it touches at 0.35 at most."""
    from scipy.ndimage import binary_dilation

    count = len(values)
    contact, overlap = np.zeros((count, count)), np.zeros((count, count))
    for n, labels in anchors.items():
        labels = np.asarray(labels)
        masks = [labels == v for v in values]
        index = grey_value_bins(images(n), bins)
        histograms = [np.bincount(index[m], minlength=bins) / max(1, int(m.sum())) for m in masks]
        for i in range(count):
            for j in range(i + 1, count):
                if masks[i].any() and masks[j].any():
                    touching = np.count_nonzero(binary_dilation(masks[i]) & masks[j])
                    contact[i, j] = max(contact[i, j], touching / np.sqrt(min(masks[i].sum(), masks[j].sum())))
                    overlap[i, j] = max(overlap[i, j], float(np.minimum(histograms[i], histograms[j]).sum()))
    partners = (contact > min_contact) & (overlap > min_overlap)
    return partners | partners.T


def straight_part_boundary(labels: np.ndarray, a: int, b: int, min_accuracy: float = 0.9) -> np.ndarray | None:
    """The straight line that best separates part ``a`` from part ``b`` on the (H, W) label slice ``labels``.

    Returns w (3,) with ``w @ (row, column, 1) > 0`` on a's side. Its direction comes from class-balanced least
    squares on the two parts' pixel coordinates (the smaller part weighs as much as the larger); its offset is the
    one that puts the largest mean share of each part on its own side. None where either part is absent, or where
    the line puts fewer than ``min_accuracy`` of the pixels of either part on its own side (a boundary a line cannot
    follow, such as a ring around a disc). Least squares with an intercept is unchanged by scaling an axis, so the
    line is the same in pixels or millimetres."""
    inside_a, inside_b = labels == a, labels == b
    count_a, count_b = int(inside_a.sum()), int(inside_b.sum())
    if count_a == 0 or count_b == 0:
        return None
    rows, cols = np.nonzero(inside_a | inside_b)
    is_a = inside_a[rows, cols]
    design = _pixel_design(rows, cols)
    weight = np.sqrt(np.where(is_a, 1.0 / count_a, 1.0 / count_b))
    w = np.linalg.lstsq(design * weight[:, None], np.where(is_a, 1.0, -1.0) * weight, rcond=None)[0]
    # The offset: a cut between consecutive projections, keeping the most of each part on its side.
    projection = design[:, :2] @ w[:2]
    order = np.argsort(projection, kind="stable")
    ordered, below_a = projection[order], np.cumsum(is_a[order])
    below_b = np.arange(1, len(order) + 1) - below_a
    kept = (count_a - below_a) / count_a + below_b / count_b  # a above the cut, b below it (both shares)
    kept[:-1][ordered[1:] == ordered[:-1]] = -1.0  # no cut between equal projections
    best = int(np.argmax(kept))
    w[2] = -(ordered[best] + ordered[min(best + 1, len(order) - 1)]) / 2.0
    on_a_side = design @ w > 0
    if min(float(on_a_side[is_a].mean()), float((~on_a_side[~is_a]).mean())) < min_accuracy:
        return None
    return w


def split_by_part_boundary(labels: np.ndarray, a: int, b: int, w: np.ndarray) -> None:
    """Give every pixel of parts ``a`` or ``b`` on the (H, W) slice ``labels`` the part on its side of the line ``w``
    (:func:`straight_part_boundary`), in place."""
    rows, cols = np.nonzero((labels == a) | (labels == b))
    labels[rows, cols] = np.where(_pixel_design(rows, cols) @ w > 0, a, b)


def part_boundaries(drawn: Mapping[int, np.ndarray], values: Sequence[int], partners: np.ndarray
                    ) -> dict[tuple[int, int], dict[int, np.ndarray]]:
    """The straight boundaries drawn between parts of one tissue: for each pair (a, b) of ``values`` that
    ``partners`` ((L, L) bool, :func:`one_tissue_partners`) pairs, the line (:func:`straight_part_boundary`) on each
    labelled slice of ``drawn`` (slice index -> (H, W) labels) that a line separates. Pairs no slice separates are
    left out."""
    boundaries: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for i, j in zip(*np.nonzero(np.triu(partners, 1)), strict=True):
        a, b = values[i], values[j]
        lines = {n: w for n, lab in drawn.items() if (w := straight_part_boundary(np.asarray(lab), a, b)) is not None}
        if lines:
            boundaries[a, b] = lines
    return boundaries


def nearest_line(lines: Mapping[int, np.ndarray], index: int) -> np.ndarray:
    """The line of ``lines`` (labelled slice index -> line) drawn on the slice nearest ``index``; of two at the same
    distance, the one on the lower slice."""
    return lines[min(lines, key=lambda n: (abs(n - index), n))]


def _pixel_design(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(P,) pixel rows and columns -> (P, 3) float64 rows (row, column, 1) of a line's equation."""
    return np.stack([rows, cols, np.ones_like(rows)], axis=1).astype(np.float64)


def most_probable_labels(probabilities: torch.Tensor, values: Sequence[int]) -> np.ndarray:
    """(L + 1, S, S) class scores (channel 0 the background) -> (S, S) int64 map of the label values that win."""
    winner = probabilities.max(dim=0).indices.numpy()  # as argmax (first maximum), 10x faster over dim 0 on CPU
    labels = np.zeros(winner.shape, dtype=np.int64)
    for i, value in enumerate(values):
        labels[winner == i + 1] = value
    return labels


def carry_labels(warp: LabelWarp, labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """(S, S) int64 labels carried by the registration ``warp`` (:func:`insid3_med.registration.demons_label_warp`):
    each pixel takes its most probable carried label."""
    if not np.any(labels):
        return np.zeros(labels.shape, dtype=np.int64)
    return most_probable_labels(warp(labels, values), values)


def registration_shrink(side: int, registration_size: int | None) -> int:
    """The bin factor that brings an (S, S) crop of ``side`` pixels to about ``registration_size`` for registration
    (1 when ``registration_size`` is None or not smaller than the side)."""
    if registration_size is None:
        return 1
    return max(1, round(side / registration_size))


def tracked_gate_centre(previous: np.ndarray, tracked: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """(S, S) labels the gate is centred on: each structure where the registration track ``tracked`` (S, S) puts
    it, or where the previous slice's labels ``previous`` (S, S) hold it if the track has lost it."""
    centre = np.zeros(previous.shape, dtype=np.int64)
    for value in values:
        source = tracked if np.any(tracked == value) else previous
        centre[(source == value) & (centre == 0)] = value
    return centre


def _chain_order(anchors: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int, int | None]]:
    """Per anchor and direction: (anchor, step, last slice index inclusive, the next anchor that way or None)."""
    plans: list[tuple[int, int, int, int | None]] = []
    ordered = sorted(anchors)
    for position, anchor in enumerate(ordered):
        below = ordered[position - 1] if position > 0 else None
        above = ordered[position + 1] if position + 1 < len(ordered) else None
        last_up = (anchor + above) // 2 if above is not None else stop - 1
        last_down = (below + anchor) // 2 + 1 if below is not None else start
        plans.append((anchor, 1, last_up, above))
        plans.append((anchor, -1, last_down, below))
    return plans


def structure_groups(anchors: Mapping[int, np.ndarray], values: Sequence[int],
                     independent: bool = False) -> list[tuple[list[int], list[int]]]:
    """The chains to run: (labelled slices, structures) pairs, the structures grouped by the labelled slices that
    hold them, so that a structure drawn on some slices only is chained from those (like 3D Slicer's "fill between
    slices", a slice labelled with other structures does not say this one is absent there). With ``independent``
    each structure is a group of its own. Structures no slice holds are left out."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for value in values:
        holders = tuple(n for n in sorted(anchors) if np.any(np.asarray(anchors[n]) == value))
        if holders:
            groups.setdefault((value,) + holders if independent else holders, []).append(value)
    return [(list(key[1:] if independent else key), group) for key, group in groups.items()]


def propagate_crops(anchors: Mapping[int, np.ndarray], features: FeatureSource, values: Sequence[int],
                    grid: tuple[int, int], params: PropagationParams, *, start: int, stop: int,
                    images: ImageSource | None = None, extra_context: Sequence[ContextSlice] = (),
                    progress: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
    """Chain the labelled crops ``anchors`` (slice index -> (S, S) label map) through slices [start, stop).

    features: slice index -> (N, C) features of its crop; images: slice index -> (S, S) grey crop (for the
    refinement and the registration prior; without it neither is used); extra_context: more labelled slices kept in
    every slice's context (for example another study's). Between two anchors each serves the slices nearer to it.
    Structures are chained together from the labelled slices that hold them (:func:`structure_groups`): when the
    slices hold different structures, or with ``params.independent_structures`` (each structure on its own), each
    group is chained from its own slices, the others counting as background, and a pixel claimed by several goes to
    the most confident. Returns slice index -> (S, S) label map for every slice reached (on an anchor, the
    structures drawn there exactly as drawn and the others as their own chains predict them; uint8 when every
    value is below 256, else int32, so that a long chain of large crops stays small in memory); beyond a
    structure's end it is absent from the slices.
    """
    if not anchors:
        raise ValueError("propagate_crops needs at least one labelled slice")
    values = list(values)
    groups = structure_groups(anchors, values, params.independent_structures and len(values) > 1)
    if len(groups) <= 1:
        return _propagate_chain(anchors, features, values, grid, params, start, stop, images, extra_context,
                                progress, keep_confidence=False)[0]
    dtype = label_dtype(values)
    merged: dict[int, np.ndarray] = {}
    best: dict[int, np.ndarray] = {}
    visited: set[int] = set()
    for holders, group in groups:
        own = {n: np.where(np.isin(anchors[n], group), np.asarray(anchors[n]), 0).astype(np.int64) for n in holders}
        columns = [values.index(v) + 1 for v in group]
        extra = [ContextSlice(c.features, torch.cat([1.0 - c.labels[:, columns].sum(1, keepdim=True),
                                                    c.labels[:, columns]], dim=1)) for c in extra_context]
        labels, confidence = _propagate_chain(own, features, group, grid, params, start, stop, images, extra,
                                              None, keep_confidence=True)
        for n, lab in labels.items():
            if n not in merged:
                merged[n] = np.zeros(lab.shape, dtype=dtype)
                best[n] = np.zeros(lab.shape, dtype=np.float32)
            score = confidence.get(n, np.ones(lab.shape, dtype=np.float32))
            take = (lab != 0) & (score > best[n])
            merged[n][take] = lab[take]
            best[n][take] = score[take]
            if progress is not None and n not in anchors and n not in visited:
                visited.add(n)
                progress(n)
    for n, lab in anchors.items():
        merged[n] = keep_drawn_labels(merged.get(n, np.zeros(lab.shape, dtype=dtype)), lab).astype(dtype)
    return merged


def keep_drawn_labels(predicted: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """A labelled slice's result: each structure drawn on it exactly as drawn, the structures not drawn on it as
    ``predicted`` (chained from the slices that hold them) outside the drawn ones. predicted, drawn: label maps of
    one shape (a slice, (H, W)); returns a new array of ``predicted``'s dtype."""
    drawn = np.asarray(drawn)
    result = np.array(predicted, copy=True)
    result[np.isin(result, np.unique(drawn[drawn != 0]))] = 0
    result[drawn != 0] = drawn[drawn != 0]
    return result


def majority_labels(label_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per voxel, the label value that more than half of ``label_maps`` (M arrays of one shape) give; background (0)
    where none has a strict majority. Returns an int64 array of that shape."""
    if not label_maps:
        raise ValueError("majority_labels needs at least one label map")
    output = np.zeros(np.shape(label_maps[0]), dtype=np.int64)
    values = sorted({int(v) for labels in label_maps for v in np.unique(labels) if v != 0})
    for value in values:
        votes = np.zeros(output.shape, dtype=np.int32)
        for labels in label_maps:
            votes += np.asarray(labels) == value
        output[2 * votes > len(label_maps)] = value  # at most one value holds a strict majority
    return output


def label_dtype(values: Sequence[float]) -> type[np.integer]:
    """The smallest of uint8, int32 and int64 that holds every (non-negative) label value."""
    top = max(values, default=0)
    return np.uint8 if top <= np.iinfo(np.uint8).max else np.int32 if top <= np.iinfo(np.int32).max else np.int64


def _propagate_chain(anchors: Mapping[int, np.ndarray], features: FeatureSource, values: list[int],
                     grid: tuple[int, int], params: PropagationParams, start: int, stop: int,
                     images: ImageSource | None, extra_context: Sequence[ContextSlice],
                     progress: Callable[[int], None] | None,
                     keep_confidence: bool) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """:func:`propagate_crops` for all ``values`` at once; also returns each slice's (S, S) decision confidence
    (if ``keep_confidence``, else an empty dict)."""
    confidences: dict[int, np.ndarray] = {}
    side = next(iter(anchors.values())).shape[0]
    allowed = neighbourhood_mask(grid, params.neighbourhood)
    anchor_context = {n: ContextSlice(features(n), patch_label_fractions(lab, values, grid))
                      for n, lab in anchors.items()}
    anchor_area = {v: max(1, max(int(np.count_nonzero(lab == v)) for lab in anchors.values())) for v in values}
    compact = label_dtype(values)
    results: dict[int, np.ndarray] = {n: np.asarray(lab, dtype=compact) for n, lab in anchors.items()}
    class_weights = None
    if params.area_calibration:
        class_weights = torch.stack([area_preserving_weights(lab, values, grid) for lab in anchors.values()]).mean(0)
    register = params.registration_weight > 0 and images is not None
    track = params.gate_tracking and params.gate_sigma is not None and images is not None
    if register or track:
        from insid3_med.registration import demons_label_warp
    shrink = registration_shrink(side, params.registration_size)
    partners = None
    if params.gate_union_one_tissue and not params.gate_union and len(values) > 1 and images is not None:
        partners = one_tissue_partners(anchors, images, values)
    histograms = None
    if params.intensity_likelihood is not None and images is not None:
        histograms = labelled_intensity_histograms(anchors, images, values)
    part_lines: dict[tuple[int, int], dict[int, np.ndarray]] = {}  # (part, part) -> anchor -> the line drawn there
    if params.split_one_tissue_parts and params.split_parts_in_chain and partners is not None:
        part_lines = part_boundaries(anchors, values, partners)
    for anchor, step, last, neighbour in _chain_order(list(anchors), start, stop):
        if (last - anchor) * step < 0:
            continue
        keep_going = set(values) & (set(np.unique(anchors[neighbour])) if neighbour is not None else set())
        active = [v for v in values if np.any(anchors[anchor] == v)]
        recent: list[ContextSlice] = []
        peak: dict[int, float] = {}  # per structure: the highest mean confidence so far in this direction
        previous_index, previous_labels = anchor, results[anchor]
        tracked = np.asarray(anchors[anchor], dtype=np.int64)  # the anchor's labels carried by registration alone
        index = anchor + step
        while active and (last - index) * step >= 0:
            target = features(index)
            nearest_anchors = sorted(anchor_context, key=lambda n: abs(n - index))[:2]
            context = [anchor_context[n] for n in nearest_anchors] + list(extra_context)
            if params.recent_slices:
                context += recent[-params.recent_slices :]
            image = images(index) if images is not None else None
            warped, prior = None, previous_labels
            if register or (track and tracked.any()):  # one registration of the slice pair serves both
                if images is None or image is None:  # register and track are only set with images
                    raise ValueError("registration of neighbouring slices needs their images")
                warp = demons_label_warp(images(previous_index), image, shrink)
                if register:
                    warped = warp(previous_labels, values)
                if track:
                    tracked = carry_labels(warp, tracked, values)
            if track:
                prior = tracked_gate_centre(previous_labels, tracked, values)
            decided: list[np.ndarray] = []
            likelihood = None
            if histograms is not None and image is not None and params.intensity_likelihood is not None:
                likelihood = intensity_likelihood(histograms, image, params.intensity_likelihood)
            labels = label_slice(target, context, values, grid, side, params, allowed, prior=prior,
                                 image=image, warped=warped, active=active, class_weights=class_weights,
                                 confidence=decided, likelihood=likelihood, partners=partners)
            if keep_confidence:
                confidences[index] = decided[0]
            for (a, b), lines in part_lines.items():
                if a in active and b in active:  # the line of the nearest anchor that draws one
                    split_by_part_boundary(labels, a, b, nearest_line(lines, index))
            for v in list(active):
                area = np.count_nonzero(labels == v)
                confidence = float(decided[0][labels == v].mean()) if area else 0.0
                ended = area < params.stop_ratio * anchor_area[v] or (
                    params.stop_confidence is not None and confidence < params.stop_confidence * peak.get(v, 0.0))
                if v not in keep_going and ended:
                    labels[labels == v] = 0
                    active.remove(v)
                else:
                    peak[v] = max(peak.get(v, 0.0), confidence)
            results[index] = labels.astype(compact)
            if progress is not None:
                progress(index)
            recent.append(ContextSlice(target, patch_label_fractions(labels, values, grid)))
            previous_index, previous_labels = index, labels
            index += step
    return results, confidences
