"""The three evaluation tasks: plan the episodes, score one episode, summarise the scores.

- ``images``: 2D one-shot episodes. Images are resized to s x s (bilinear) and masks to s x s (nearest), the
  method predicts at s x s, and each episode's confusion counts are kept so that IoU pools over a class's episodes
  (mIoU = mean over classes x 100; FB-IoU = mean of pooled background and foreground IoU x 100), beside the
  per-episode Dice.
- ``slices``: one slice of one structure labelled, propagated through its volume; 3D Dice (also without the
  labelled slice), HD95 in mm, false-positive slices beyond the structure's extent, 2D Dice by distance (slices)
  from the labelled slice.
- ``transfer``: reference A's labels (the whole label map, only its slice of largest labelled area, or each
  structure on its own slice of largest area) carried to target B; per structure 3D Dice and HD95 in mm. Both
  volumes are read in the first structure's modality.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from insid3_med.evaluation.datasets import (
    ImageDataset,
    Structure,
    VolumeCase,
    VolumeDataset,
    read_mask,
    read_rgb_image,
)
from insid3_med.evaluation.episodes import (
    ALL_SLICE_KINDS,
    EACH_LARGEST,
    SLICE_KINDS,
    SPACED_KINDS,
    UNION_LARGEST,
    ImageEpisode,
    labelled_slice,
    sample_image_episodes,
    sample_pairs,
    select_cases,
    spaced_slices,
)
from insid3_med.evaluation.methods import EvaluationMethod
from insid3_med.evaluation.metrics import (
    confusion_counts,
    dice,
    dice_by_distance,
    false_positive_slices,
    hd95_mm,
    pooled_iou,
)
from insid3_med.imaging.geometry import Volume, float_triple

TASKS = ("images", "slices", "transfer")
REFERENCE_MODES = ("volume", "slice", EACH_LARGEST)
PAIRINGS = ("subjects", "frames")
"""Transfer pairs: a reference and a target of different subjects, or two time frames of one subject."""


@dataclass(frozen=True)
class Episode:
    """A planned episode: its id (stable across runs) and what the task needs to run it."""

    episode_id: str
    spec: Any


def statistics(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, std, median, quartiles, min and max of finite values (None when there are none)."""
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "q25": None, "q75": None, "min": None,
                "max": None}
    q25, median, q75 = np.percentile(array, [25, 50, 75])
    return {"n": int(array.size), "mean": float(array.mean()), "std": float(array.std()),
            "median": float(median), "q25": float(q25), "q75": float(q75), "min": float(array.min()),
            "max": float(array.max())}


# ------------------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------------------


class ImageTask:
    """2D one-shot episodes scored at ``size`` x ``size``."""

    name = "images"

    def __init__(self, dataset: ImageDataset, size: int, shots: int = 1, cache_size: int = 64) -> None:
        self.dataset = dataset
        self.size = int(size)
        self.shots = shots
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    def options(self) -> dict[str, Any]:
        return {"size": self.size, "shots": self.shots}

    def plan(self, count: int, seed: int) -> list[Episode]:
        episodes = sample_image_episodes(self.dataset, count, seed, self.shots)
        return [Episode(e.episode_id(self.dataset), e) for e in episodes]

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(s, s, 3) uint8 image and (s, s) label mask of case ``index`` (bilinear / nearest resize)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        case = self.dataset.cases[index]
        image = read_rgb_image(case.image_path)
        mask = read_mask(case.mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{case.mask_path}: mask size {mask.shape} differs from image {image.shape[:2]}")
        size = (self.size, self.size)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
        mask = mask.astype(np.int32)
        self._cache[index] = (image, mask)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image, mask

    def run(self, episode: Episode, method: EvaluationMethod) -> dict[str, Any]:
        spec: ImageEpisode = episode.spec
        image_class = next(c for c in self.dataset.classes if c.name == spec.class_name)
        target_image, target_mask = self._load(spec.target)
        truth = image_class.binary(target_mask)
        references = [(image, image_class.binary(mask)) for image, mask in map(self._load, spec.references)]
        start = time.perf_counter()
        prediction = method.segment_image(references, target_image)
        seconds = time.perf_counter() - start
        counts = confusion_counts(prediction, truth)
        return {
            "class": spec.class_name,
            "target": self.dataset.cases[spec.target].name,
            "references": [self.dataset.cases[r].name for r in spec.references],
            **counts,
            "dice": dice(prediction, truth),
            "seconds": seconds,
        }

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        classes: dict[str, Any] = {}
        pooled = []
        for image_class in self.dataset.classes:
            records = [r for r in results if r["class"] == image_class.name]
            if not records:
                continue
            iou = pooled_iou(records)
            pooled.append(iou)
            classes[image_class.name] = {
                "episodes": len(records),
                "iou": 100.0 * iou["iou"],
                "background_iou": 100.0 * iou["background_iou"],
                "dice": statistics([r["dice"] for r in records]),
            }
        fg = sum(p["fg_intersection"] for p in pooled) / max(1, sum(p["fg_union"] for p in pooled))
        bg = sum(p["bg_intersection"] for p in pooled) / max(1, sum(p["bg_union"] for p in pooled))
        dices = [r["dice"] for r in results]
        histogram, edges = np.histogram(dices, bins=10, range=(0.0, 1.0))
        return {
            "episodes": len(results),
            "miou": float(np.mean([c["iou"] for c in classes.values()])) if classes else None,
            "fbiou": 100.0 * (fg + bg) / 2.0 if pooled else None,
            "classes": classes,
            "dice": statistics(dices),
            "dice_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in histogram]},
            "seconds_per_episode": statistics([r["seconds"] for r in results]),
        }


# ------------------------------------------------------------------------------------------------------------
# volumes
# ------------------------------------------------------------------------------------------------------------


class _CaseCache:
    """The last few cases' volumes and label maps (episodes are ordered by case)."""

    def __init__(self, dataset: VolumeDataset, size: int = 4) -> None:
        self.dataset = dataset
        self._items: OrderedDict[tuple[str, str | None], tuple[Volume, np.ndarray]] = OrderedDict()
        self._size = size

    def get(self, case: VolumeCase, structure: Structure | None) -> tuple[Volume, np.ndarray]:
        key = (case.name, structure.modality if structure is not None else None)
        if key not in self._items:
            volume = self.dataset.load_image(case, structure)
            self._items[key] = (volume, self.dataset.load_labels(case, volume))
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]


def _spacing_kji(volume: Volume) -> tuple[float, float, float]:
    return float_triple(volume.geometry.spacing[::-1])


def _only_slice(mask: np.ndarray, axis: int, index: int) -> np.ndarray:
    given = np.zeros(mask.shape, dtype=np.int16)
    selector: list[Any] = [slice(None)] * mask.ndim
    selector[axis] = index
    given[tuple(selector)] = mask[tuple(selector)]
    return given


def _only_slices(mask: np.ndarray, axis: int, indices: Sequence[int]) -> np.ndarray:
    """(K, J, I) int16: ``mask`` on the slices ``indices`` along ``axis``, 0 elsewhere."""
    given = np.zeros(mask.shape, dtype=np.int16)
    for index in indices:
        given += _only_slice(mask, axis, index)
    return given


def _structure_map(structures: Sequence[Structure], labels: np.ndarray, name: str, purpose: str) -> np.ndarray:
    """(K, J, I) int16: each structure's index in ``structures`` + 1 where it lies in the (K, J, I) ``labels``, 0
    elsewhere. Structures that overlap are refused with a ValueError naming ``name`` (the case) and ``purpose`` (what
    needs them apart)."""
    mapped = np.zeros(labels.shape, dtype=np.int16)
    for structure_index, structure in enumerate(structures):
        mask = structure.binary(labels)
        if np.any(mask & (mapped != 0)):
            raise ValueError(f"{name}: structure {structure.name!r} overlaps another; the {purpose} needs structures "
                             "that do not overlap")
        mapped[mask] = structure_index + 1
    return mapped


def _each_on_its_largest_slice(structures: Sequence[Structure], labels: np.ndarray, axis: int, name: str,
                               purpose: str) -> list[tuple[int, np.ndarray, int]]:
    """For each structure present in the (K, J, I) ``labels``: (its index in ``structures``, the (K, J, I) bool mask
    of it on its own slice of largest area along ``axis``, that slice's index). Structures that overlap are refused
    (:func:`_structure_map`)."""
    mapped = _structure_map(structures, labels, name, f"{EACH_LARGEST} {purpose}")
    chosen = []
    for structure_index in range(len(structures)):
        mask = mapped == structure_index + 1
        if mask.any():
            index = labelled_slice(mask, axis, EACH_LARGEST, 0, 0, structure_index)
            chosen.append((structure_index, _only_slice(mask, axis, index) != 0, index))
    return chosen


class SliceTask:
    """One labelled slice of one structure, propagated through its volume."""

    name = "slices"

    def __init__(self, dataset: VolumeDataset, kinds: Sequence[str] = SLICE_KINDS) -> None:
        unknown = set(kinds) - set(ALL_SLICE_KINDS)
        if unknown:
            raise ValueError(f"unknown slice kinds {sorted(unknown)}; choose from {ALL_SLICE_KINDS}")
        self.dataset = dataset
        self.kinds = tuple(kinds)
        self._cases = _CaseCache(dataset)
        self._seed = 0
        # per kind, the last every-structure run: (case index, method id), prediction, labelled slices
        self._joint: dict[str, tuple[tuple[int, int], np.ndarray, dict[int, int]]] = {}

    def options(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "slice_axis_rule": self.dataset.slice_axis_rule}

    def plan(self, count: int | None, seed: int) -> list[Episode]:
        """Episodes of ``count`` seeded cases (all when None), case by case, each structure and kind."""
        self._seed = seed
        episodes = []
        for case_index in select_cases(len(self.dataset.cases), count, seed):
            case = self.dataset.cases[case_index]
            for structure_index, structure in enumerate(self.dataset.structures):
                for kind in self.kinds:
                    episodes.append(Episode(f"{case.name}:{structure.name}:{kind}",
                                            (case_index, structure_index, kind)))
        return episodes

    def run(self, episode: Episode, method: EvaluationMethod) -> dict[str, Any]:
        case_index, structure_index, kind = episode.spec
        case = self.dataset.cases[case_index]
        structure = self.dataset.structures[structure_index]
        volume, labels = self._cases.get(case, structure)
        axis = self.dataset.slice_axis(volume)
        truth = structure.binary(labels)
        record: dict[str, Any] = {"case": case.name, "structure": structure.name, "kind": kind, "axis": axis}
        if not truth.any():
            return {**record, "absent": True}
        start = time.perf_counter()
        index: int | list[int]
        if kind in (EACH_LARGEST, UNION_LARGEST):
            joint, slices = self._every_structure(case_index, kind, volume, labels, axis, method)
            index, predicted = slices[structure_index], joint == structure_index + 1
        elif kind in SPACED_KINDS:
            index = spaced_slices(truth, axis, int(kind.removeprefix("spaced")))
            given = _only_slices(truth, axis, index)
            predicted = method.propagate(volume, given, axis, cache_key=(case.name, structure.modality)) != 0
        else:
            index = labelled_slice(truth, axis, kind, self._seed, case_index, structure_index)
            given = _only_slice(truth, axis, index)
            predicted = method.propagate(volume, given, axis, cache_key=(case.name, structure.modality)) != 0
        seconds = time.perf_counter() - start
        spacing = _spacing_kji(volume)
        distance, capped = hd95_mm(predicted, truth, spacing)
        fp_slices, outside = false_positive_slices(predicted, truth, axis)
        unlabelled = np.ones(truth.shape, dtype=bool)
        unlabelled[tuple(index if a == axis else slice(None) for a in range(3))] = False  # index: one or a list
        return {
            **record,
            "slice": index,
            "slices": int(truth.shape[axis]),
            "slice_spacing_mm": spacing[axis],
            "dice": dice(predicted, truth),
            "dice_unlabelled": dice(predicted & unlabelled, truth & unlabelled),
            "hd95_mm": distance,
            "hd95_capped": capped,
            "fp_slices": fp_slices,
            "outside_slices": outside,
            "dice_by_distance": {str(d): v for d, v in dice_by_distance(predicted, truth, axis, index).items()},
            "predicted_empty": not bool(predicted.any()),
            "seconds": seconds,
        }

    def _every_structure(self, case_index: int, kind: str, volume: Volume, labels: np.ndarray, axis: int,
                         method: EvaluationMethod) -> tuple[np.ndarray, dict[int, int]]:
        """Every present structure drawn at once (value: structure index + 1), propagated in one run: each on its own
        slice of largest area (``each_largest``) or all on the slice where their union's area is largest
        (``union_largest``). Returns the (K, J, I) prediction and each present structure's labelled slice. The run is
        kept, per kind, for the case's other structures (their episodes follow one another)."""
        key = (case_index, id(method))
        if kind in self._joint and self._joint[kind][0] == key:
            return self._joint[kind][1], self._joint[kind][2]
        case = self.dataset.cases[case_index]
        slices: dict[int, int] = {}
        if kind == EACH_LARGEST:
            given = np.zeros(labels.shape, dtype=np.int16)
            for structure_index, where, index in _each_on_its_largest_slice(self.dataset.structures, labels, axis,
                                                                            case.name, "slice kind"):
                slices[structure_index] = index
                given[where] = structure_index + 1
        else:
            mapped = _structure_map(self.dataset.structures, labels, case.name, f"{UNION_LARGEST} slice kind")
            index = labelled_slice(mapped != 0, axis, "largest", 0, 0, 0)
            given = _only_slice(mapped, axis, index)
            slices = {int(v) - 1: index for v in np.unique(mapped) if v != 0}
        joint = np.asarray(method.propagate(volume, given, axis, cache_key=(case.name, kind)))
        self._joint[kind] = (key, joint, slices)
        return joint, slices

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        present = [r for r in results if not r.get("absent")]
        structures: dict[str, Any] = {}
        for structure in self.dataset.structures:
            groups = {k: _slice_group([r for r in present if r["structure"] == structure.name and r["kind"] == k])
                      for k in self.kinds}
            structures[structure.name] = {k: g for k, g in groups.items() if g["episodes"]}
        overall = {k: _slice_group([r for r in present if r["kind"] == k]) for k in self.kinds}
        return {
            "episodes": len(present),
            "absent": len(results) - len(present),
            "structures": structures,
            "overall": overall,
            "seconds_per_episode": statistics([r["seconds"] for r in present]),
        }


def _slice_group(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_distance: dict[int, list[float]] = {}
    for record in records:
        for distance, value in record["dice_by_distance"].items():
            by_distance.setdefault(int(distance), []).append(value)
    fp = sum(r["fp_slices"] for r in records)
    outside = sum(r["outside_slices"] for r in records)
    return {
        "episodes": len(records),
        "dice": statistics([r["dice"] for r in records]),
        "dice_unlabelled": statistics([r["dice_unlabelled"] for r in records]),
        "hd95_mm": statistics([r["hd95_mm"] for r in records]),
        "hd95_capped": sum(bool(r["hd95_capped"]) for r in records),
        "predicted_empty": sum(bool(r["predicted_empty"]) for r in records),
        "fp_slice_share": fp / outside if outside else None,
        "fp_slices": fp,
        "outside_slices": outside,
        "dice_by_distance": {str(d): {"mean": float(np.mean(v)), "n": len(v)}
                             for d, v in sorted(by_distance.items())},
    }


class TransferTask:
    """Reference A's labels carried to target B over seeded pairs of cases."""

    name = "transfer"

    def __init__(self, dataset: VolumeDataset, reference_mode: str = "volume", pairing: str = "subjects") -> None:
        if reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}, not {reference_mode!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, not {pairing!r}")
        self.dataset = dataset
        self.reference_mode = reference_mode
        self.pairing = pairing
        self._cases = _CaseCache(dataset)

    def options(self) -> dict[str, Any]:
        options = {"reference_mode": self.reference_mode, "slice_axis_rule": self.dataset.slice_axis_rule}
        if self.pairing != "subjects":  # recorded only when not the default, so earlier reports keep their key
            options["pairing"] = self.pairing
        return options

    def plan(self, count: int | None, seed: int) -> list[Episode]:
        """``count`` seeded (reference, target) pairs (None: 50, or all of a smaller set): of different subjects,
        or of two time frames of one subject with the ``frames`` pairing."""
        cases = self.dataset.cases
        pairs = sample_pairs(len(cases), 50 if count is None else count, seed, [c.subject for c in cases],
                             same_subject=self.pairing == "frames")
        return [Episode(f"{cases[a].name}->{cases[b].name}", (a, b)) for a, b in pairs]

    def run(self, episode: Episode, method: EvaluationMethod) -> dict[str, Any]:
        a, b = episode.spec
        first = self.dataset.structures[0] if self.dataset.structures else None
        reference, reference_labels = self._cases.get(self.dataset.cases[a], first)
        target, target_labels = self._cases.get(self.dataset.cases[b], first)
        axis = self.dataset.slice_axis(reference)
        given = reference_labels
        record: dict[str, Any] = {"reference": self.dataset.cases[a].name, "target": self.dataset.cases[b].name,
                                  "mode": self.reference_mode, "axis": axis}
        if self.reference_mode == "slice":
            other = tuple(x for x in range(3) if x != axis)
            index = int(np.argmax(np.count_nonzero(reference_labels, axis=other)))
            given = _only_slice(reference_labels, axis, index)
            record["slice"] = index
        elif self.reference_mode == EACH_LARGEST:
            given, slices = self._each_on_its_largest_slice(self.dataset.cases[a].name, reference_labels, axis)
            record["slices"] = slices
        start = time.perf_counter()
        predicted = method.transfer(reference, given, target, axis, same_subject=self.pairing == "frames")
        seconds = time.perf_counter() - start
        spacing = _spacing_kji(target)
        structures = {}
        for structure in self.dataset.structures:
            truth = structure.binary(target_labels)
            if not truth.any():
                continue
            mask = structure.binary(predicted)
            distance, capped = hd95_mm(mask, truth, spacing)
            structures[structure.name] = {"dice": dice(mask, truth), "hd95_mm": distance, "hd95_capped": capped,
                                          "predicted_empty": not bool(mask.any())}
        return {**record, "structures": structures, "seconds": seconds}

    def _each_on_its_largest_slice(self, name: str, labels: np.ndarray,
                                   axis: int) -> tuple[np.ndarray, dict[str, int]]:
        """The reference's labels kept only on each structure's own slice of largest area (label values as in the
        data): the (K, J, I) given labels and each present structure's slice index. Overlapping structures are
        refused, as by the slices task's ``each_largest`` kind."""
        given = np.zeros_like(labels)
        slices: dict[str, int] = {}
        for structure_index, where, index in _each_on_its_largest_slice(self.dataset.structures, labels, axis, name,
                                                                        "reference mode"):
            slices[self.dataset.structures[structure_index].name] = index
            given[where] = labels[where]
        return given, slices

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        structures = {}
        for structure in self.dataset.structures:
            scores = [r["structures"][structure.name] for r in results if structure.name in r["structures"]]
            if scores:
                structures[structure.name] = _transfer_group(scores)
        every = [s for r in results for s in r["structures"].values()]
        return {
            "episodes": len(results),
            "structures": structures,
            "overall": _transfer_group(every),
            "seconds_per_episode": statistics([r["seconds"] for r in results]),
        }


def _transfer_group(scores: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "episodes": len(scores),
        "dice": statistics([s["dice"] for s in scores]),
        "hd95_mm": statistics([s["hd95_mm"] for s in scores]),
        "hd95_capped": sum(bool(s["hd95_capped"]) for s in scores),
        "predicted_empty": sum(bool(s["predicted_empty"]) for s in scores),
    }


def headline(task: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The few figures that sum up an evaluation (printed by the command line)."""
    if task == "images":
        return {"episodes": summary["episodes"], "miou": summary["miou"], "fbiou": summary["fbiou"],
                "dice_mean": summary["dice"]["mean"]}
    if task == "slices":
        figures: dict[str, Any] = {"episodes": summary["episodes"]}
        for kind, group in summary["overall"].items():
            figures[f"dice_{kind}_slice"] = group["dice"]["mean"]
            figures[f"hd95_mm_median_{kind}_slice"] = group["hd95_mm"]["median"]
            figures[f"fp_slice_share_{kind}_slice"] = group["fp_slice_share"]
        return figures
    overall = summary["overall"]
    return {"episodes": summary["episodes"], "dice": overall["dice"]["mean"],
            "hd95_mm_median": overall["hd95_mm"]["median"]}
