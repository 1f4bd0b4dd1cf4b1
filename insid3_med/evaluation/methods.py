"""The methods an evaluation compares, behind one interface: ``copy``, ``registration`` and ``ours``.

Each method answers the three tasks' questions:

- ``segment_image(references, target_image)``: (H, W) bool prediction for the (H, W, 3) uint8 target, from
  reference shots, each an (H, W, 3) uint8 image with its (H, W) bool mask (baselines with several shots take the
  pixel-wise majority of their per-shot predictions);
- ``propagate(volume, labels, axis)``: (K, J, I) labels with one labelled slice along ``axis`` -> (K, J, I) labels;
- ``transfer(reference, reference_labels, target, axis)``: a reference volume's labels (one slice or all of them)
  -> the target's (K', J', I') labels.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from insid3_med.evaluation.baselines import (
    RegistrationParams,
    SliceChainRegistration,
    copy_by_position,
    copy_labelled_slice,
    copy_mask_2d,
    register_mask_2d,
    register_volume_labels,
)
from insid3_med.imaging.geometry import Volume
from insid3_med.interpolation import interpolate_between_slices

METHODS = ("copy", "registration", "interpolation", "ours")


class EvaluationMethod(ABC):
    """A method scored by the harness."""

    name: str = ""

    def describe(self) -> dict[str, Any]:
        """Everything that determines the method's output (recorded in reports and in the episode keys)."""
        return {"method": self.name}

    @abstractmethod
    def segment_image(self, references: Sequence[tuple[np.ndarray, np.ndarray]],
                      target_image: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def propagate(self, volume: Volume, labels: np.ndarray, axis: int, cache_key: object = None) -> np.ndarray: ...

    @abstractmethod
    def transfer(self, reference: Volume, reference_labels: np.ndarray, target: Volume, axis: int,
                 same_subject: bool = False) -> np.ndarray:
        """``target``'s label map from ``reference_labels``; ``same_subject``: ``target`` is another time frame of
        the reference's subject (the ``frames`` pairing)."""


def _majority(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Pixel-wise majority (at least half) of several (H, W) masks, as bool."""
    votes = np.sum([np.asarray(m) != 0 for m in masks], axis=0)
    return votes * 2 >= len(masks)


def _single_slice(labels: np.ndarray, axis: int) -> bool:
    other = tuple(a for a in range(labels.ndim) if a != axis)
    return int(np.count_nonzero(np.any(labels != 0, axis=other))) == 1


def _each_structure_from_its_slice(labels: np.ndarray, axis: int,
                                   single: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Labels on one slice go to ``single`` as they are. Labels on several slices: each structure (label value) goes
    on its own, and the results merge as the volume mode merges structures drawn on different slices
    (:func:`insid3_med.volume.merge_by_nearest_labelled_slice`). A structure drawn on several slices goes to
    ``single`` once per slice, and each slice of the result comes from its nearest labelled slice."""
    from insid3_med.volume import merge_by_nearest_labelled_slice

    if _single_slice(labels, axis):
        return single(labels)
    other = tuple(a for a in range(labels.ndim) if a != axis)
    results = []
    for value in (int(v) for v in np.unique(labels) if v != 0):
        own = np.where(labels == value, labels, 0).astype(labels.dtype)
        slices = [int(n) for n in np.flatnonzero(np.any(own != 0, axis=other))]
        if len(slices) == 1:
            results.append((single(own), slices))
        else:
            results.append((_from_nearest_labelled_slice(own, axis, slices, single), slices))
    return merge_by_nearest_labelled_slice(results, axis).astype(labels.dtype)


def _from_nearest_labelled_slice(labels: np.ndarray, axis: int, slices: Sequence[int],
                                 single: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """One structure drawn on several ``slices`` of ``labels`` (K, J, I): ``single`` from each labelled slice on its
    own; slice n of the result is slice n of the run from the labelled slice nearest to n (the lower on a tie)."""
    runs = []
    for index in slices:
        selector: list[Any] = [slice(None)] * labels.ndim
        selector[axis] = index
        one = np.zeros_like(labels)
        one[tuple(selector)] = labels[tuple(selector)]
        runs.append(np.moveaxis(np.asarray(single(one)), axis, 0))
    output = np.zeros_like(runs[0])
    for n in range(output.shape[0]):
        output[n] = runs[int(np.argmin([abs(n - index) for index in slices]))][n]
    return np.moveaxis(output, 0, axis)


def _structures_on_their_own_slices(labels: np.ndarray, axis: int) -> list[int] | None:
    """The label values of ``labels`` when they lie on several slices with each structure on one (the
    ``each_largest`` reference of a transfer), else None."""
    if _single_slice(labels, axis):
        return None
    other = tuple(a for a in range(labels.ndim) if a != axis)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if all(int(np.count_nonzero(np.any(labels == v, axis=other))) == 1 for v in values):
        return values
    return None


def _transfer_each_structure(sheets: np.ndarray, values: Sequence[int], axis: int,
                             single: Callable[[int], np.ndarray]) -> np.ndarray:
    """Structures drawn each on its own reference slice, transferred one by one (``single(value)``: the target's
    label map of that structure alone) and merged as the volume mode merges them: a voxel claimed by several goes
    to the structure whose labelled slice landed nearer, on the target, in ``sheets`` (the labelled slices carried
    onto the target grid). A structure whose slice lands outside the target is left out."""
    from insid3_med.volume import merge_by_nearest_labelled_slice

    other = tuple(a for a in range(sheets.ndim) if a != axis)
    results = []
    for value in values:
        areas = np.count_nonzero(sheets == value, axis=other)
        if areas.any():
            results.append((single(value), [int(np.argmax(areas))]))
    if not results:
        return np.zeros_like(sheets)
    return merge_by_nearest_labelled_slice(results, axis).astype(sheets.dtype)


class CopyMethod(EvaluationMethod):
    """Copy baselines: the mask as it lies (2D), the labelled slice to every slice, labels by centred position."""

    name = "copy"

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "transfer_alignment": "grid centres"}

    def segment_image(self, references: Sequence[tuple[np.ndarray, np.ndarray]],
                      target_image: np.ndarray) -> np.ndarray:
        return _majority([copy_mask_2d(mask, target_image.shape[:2]) for _, mask in references])

    def propagate(self, volume: Volume, labels: np.ndarray, axis: int, cache_key: object = None) -> np.ndarray:
        return _each_structure_from_its_slice(labels, axis, lambda own: copy_labelled_slice(own, axis))

    def transfer(self, reference: Volume, reference_labels: np.ndarray, target: Volume, axis: int,
                 same_subject: bool = False) -> np.ndarray:
        if _single_slice(reference_labels, axis):
            reference_labels = copy_labelled_slice(reference_labels, axis)
        elif (values := _structures_on_their_own_slices(reference_labels, axis)) is not None:
            return _transfer_each_structure(
                copy_by_position(reference_labels, reference, target), values, axis,
                lambda value: copy_by_position(copy_labelled_slice(np.where(reference_labels == value,
                                                                            reference_labels, 0), axis),
                                               reference, target))
        return copy_by_position(reference_labels, reference, target)


class InterpolationMethod(EvaluationMethod):
    """Interpolation between labelled slices (a "fill between slices" tool), for slices episodes with several
    labelled slices of a structure (the ``spacedN`` kinds); one labelled slice stays as it is."""

    name = "interpolation"

    def describe(self) -> dict[str, Any]:
        return {"method": self.name,
                "slices": "signed distances blended linearly between labelled slices; none beyond the first and last"}

    def segment_image(self, references: Sequence[tuple[np.ndarray, np.ndarray]],
                      target_image: np.ndarray) -> np.ndarray:
        raise ValueError("the interpolation baseline needs a volume with several labelled slices (slices task)")

    def propagate(self, volume: Volume, labels: np.ndarray, axis: int, cache_key: object = None) -> np.ndarray:
        return interpolate_between_slices(labels, axis, volume.in_plane_spacing(axis))

    def transfer(self, reference: Volume, reference_labels: np.ndarray, target: Volume, axis: int,
                 same_subject: bool = False) -> np.ndarray:
        raise ValueError("the interpolation baseline needs a volume with several labelled slices (slices task)")


class RegistrationMethod(EvaluationMethod):
    """SimpleITK registration baselines: chained slice-to-slice demons; affine + demons between images."""

    name = "registration"

    def __init__(self, params: RegistrationParams | None = None) -> None:
        self.params = params or RegistrationParams()
        self.chain = SliceChainRegistration(self.params)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "registration": self.params.as_dict(),
                "slices": "demons slice n -> n+1, chained from the labelled slice",
                "transfer": "affine (Mattes MI) then demons, labels nearest neighbour"}

    def segment_image(self, references: Sequence[tuple[np.ndarray, np.ndarray]],
                      target_image: np.ndarray) -> np.ndarray:
        return _majority([register_mask_2d(image, mask.astype(np.int16), target_image, self.params)
                          for image, mask in references])

    def propagate(self, volume: Volume, labels: np.ndarray, axis: int, cache_key: object = None) -> np.ndarray:
        return _each_structure_from_its_slice(
            labels, axis, lambda own: self.chain.propagate(volume, own, axis, cache_key=cache_key))

    def transfer(self, reference: Volume, reference_labels: np.ndarray, target: Volume, axis: int,
                 same_subject: bool = False) -> np.ndarray:
        warped = register_volume_labels(reference, reference_labels, target, self.params)
        if _single_slice(reference_labels, axis):
            return self._chain_from_sheet(target, warped, axis)
        if (values := _structures_on_their_own_slices(reference_labels, axis)) is not None:
            return _transfer_each_structure(warped, values, axis, lambda value: self._chain_from_sheet(
                target, np.where(warped == value, warped, 0), axis))
        return warped

    def _chain_from_sheet(self, target: Volume, warped: np.ndarray, axis: int) -> np.ndarray:
        """One labelled slice lands as a sheet in the target: chained from the target slice holding most of it."""
        other = tuple(a for a in range(warped.ndim) if a != axis)
        areas = np.count_nonzero(warped, axis=other)
        if not areas.any():
            return warped
        seed = np.zeros_like(warped)
        index: list[slice | int] = [slice(None)] * warped.ndim
        index[axis] = int(np.argmax(areas))
        seed[tuple(index)] = warped[tuple(index)]
        return self.chain.propagate(target, seed, axis, cache_key=None)


class OursMethod(EvaluationMethod):
    """The one-shot method (INSID3) through the library's segmenter, propagation and transfer functions.

    ``segmenter``: a :class:`~insid3_med.predictor.OneShotSegmenter`; see :func:`build_method` for building one from
    options.
    """

    name = "ours"

    def __init__(self, segmenter: Any, preset: str | None = None, weights: str | Path | None = None,
                 mode: str = "volume", params: Any = None) -> None:
        from insid3_med.volume import propagation_description

        self.propagation = propagation_description(mode, params)  # also checks the mode
        self.params = params
        self.segmenter = segmenter
        self.backbone = segmenter.backbone
        self.preset = preset
        self.weights = weights
        self.mode = mode

    def describe(self) -> dict[str, Any]:
        backbone = self.backbone
        spec = getattr(backbone, "spec", None)
        return {
            "method": self.name,
            "backbone": getattr(spec, "name", type(backbone).__name__),
            "weights": str(getattr(backbone, "location", self.weights)),
            "weights_sha256": weights_sha256(backbone, self.weights),
            "feature_block": getattr(backbone, "feature_block", None),
            "precision": getattr(backbone, "precision", None),
            "device": str(getattr(backbone, "device", "")),
            "image_size": self.segmenter.image_size,
            "fit": getattr(self.segmenter, "fit", None),
            "engine_params": _as_dict(self.segmenter.params),
            "basis_rank": getattr(self.segmenter, "basis_rank", None),
            "preset": self.preset,
            "propagation": self.propagation,
        }

    def segment_image(self, references: Sequence[tuple[np.ndarray, np.ndarray]],
                      target_image: np.ndarray) -> np.ndarray:
        shots = [(image, mask.astype(np.int64)) for image, mask in references if np.any(mask)]
        if not shots:  # nothing to look for: the prediction is empty
            return np.zeros(target_image.shape[:2], dtype=bool)
        self.segmenter.set_reference(*shots[0])
        for image, mask in shots[1:]:
            self.segmenter.add_reference(image, mask)
        return np.asarray(self.segmenter.segment(target_image)) > 0

    def propagate(self, volume: Volume, labels: np.ndarray, axis: int, cache_key: object = None) -> np.ndarray:
        from insid3_med.volume import propagate_through_slices

        return np.asarray(propagate_through_slices(self.segmenter, volume, labels, axis=axis, preset=self.preset,
                                                    mode=self.mode, params=self.params))

    def transfer(self, reference: Volume, reference_labels: np.ndarray, target: Volume, axis: int,
                 same_subject: bool = False) -> np.ndarray:
        from insid3_med.volume import transfer_to_study

        return np.asarray(transfer_to_study(self.segmenter, reference, reference_labels, target, axis=axis,
                                            preset=self.preset, mode=self.mode, params=self.params,
                                            same_subject=same_subject))


def weights_sha256(backbone: Any, weights: str | Path | None = None) -> str | None:
    """sha256 of the backbone's weights file (via the backbone when it can tell), else of ``weights`` if a file.

    A folder (Hugging Face format) is hashed through its ``model.safetensors`` (or ``pytorch_model.bin``).
    """
    method = getattr(backbone, "weights_sha256", None)
    if callable(method):
        digest = method()
        if digest:
            return str(digest)
    if weights is None:
        return None
    path = Path(weights)
    if path.is_dir():
        path = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), path)
    if not path.is_file():
        return None
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _as_dict(params: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                for k, v in dataclasses.asdict(params).items()}
    return {"repr": repr(params)}


def build_method(name: str, *, model: Any = None, backbone_options: dict[str, Any] | None = None,
                 image_size: int | None = None, engine_params: dict[str, Any] | None = None,
                 registration: RegistrationParams | None = None, preset: str | None = None,
                 mode: str = "volume", chained: bool = False, propagation: Any = None) -> EvaluationMethod:
    """The method called ``name`` (one of :data:`METHODS`).

    For ``ours`` the segmenter comes from ``model`` (an object whose ``build(chained=...)`` returns a
    ``OneShotSegmenter``, such as :class:`insid3_med.jobs.ModelOptions`) or else from ``backbone_options`` (keywords of
    ``load_backbone``: weights, device, precision, feature_block), ``image_size`` and ``engine_params``
    (``EngineParams`` fields); ``mode`` is the propagation mode of volumes (``volume`` or ``published``, see
    :mod:`insid3_med.volume`), recorded in the method's description; ``chained``: the method serves the chained
    volume propagation (passed to ``model.build`` for its "auto" precision); ``propagation``: the volume mode's
    :class:`~insid3_med.propagation.PropagationParams` (default: the defaults), recorded in the description too.
    """
    from insid3_med.volume import check_propagation_mode

    check_propagation_mode(mode)
    if name == "copy":
        return CopyMethod()
    if name == "registration":
        return RegistrationMethod(registration)
    if name == "interpolation":
        return InterpolationMethod()
    if name != "ours":
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if model is not None:
        return OursMethod(model.build(chained=chained), preset, getattr(model, "weights", None), mode, propagation)
    from insid3_med.backbones import load_backbone
    from insid3_med.engine import EngineParams
    from insid3_med.predictor import OneShotSegmenter

    options = dict(backbone_options or {})
    backbone = load_backbone(**options)
    kwargs: dict[str, Any] = {"params": EngineParams(**(engine_params or {}))}
    if image_size is not None:
        kwargs["image_size"] = int(image_size)
    return OursMethod(OneShotSegmenter(backbone, **kwargs), preset, options.get("weights"), mode, propagation)
