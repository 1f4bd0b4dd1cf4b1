"""Seeded episodes of the three tasks: which reference labels which target.

- ``images``: the reference protocol (see ALGORITHM.md): with numpy's global stream seeded, episode ``i`` takes
  class ``i mod n_classes``, draws the target from the class's pool with ``np.random.choice(pool, 1,
  replace=False)``, then draws references the same way until it has ``shots`` that differ from the target.
- ``slices``: one episode per (case, structure, kind); kind ``largest`` labels the slice where the structure's
  area is largest, kind ``random`` a slice drawn (seeded per case and structure) among those holding it, kind
  ``spacedN`` N slices spread evenly over the structure's extent (:func:`spaced_slices`); kinds ``each_largest`` and
  ``union_largest`` draw every structure of the volume at once (one run per volume).
- ``transfer``: ordered pairs (reference A, target B) of different subjects, the first ``count`` of a seeded
  permutation of all such pairs; with the ``frames`` pairing, pairs of two time frames of one subject instead
  (ACDC's end-diastole and end-systole, both ways).

A subset of ``count`` cases is the first ``count`` of a seeded permutation, so a larger count extends a smaller
one and finished episodes stay valid when an evaluation is resumed with more.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from insid3_med.evaluation.datasets import ImageDataset

SLICE_KINDS = ("largest", "random")
"""The default slice kinds: one structure per episode, labelled on its slice of largest area or a random one."""
EACH_LARGEST = "each_largest"
"""A slice kind: every structure of the volume drawn at once, each on its own slice of largest area (one run per
volume, scored structure by structure; the structures must not overlap)."""
UNION_LARGEST = "union_largest"
"""A slice kind: every structure of the volume drawn on the one slice where their union's area is largest, the way
a user labels a single slice (one run per volume, scored structure by structure; a structure absent from that slice
is not labelled, and scores what the method makes of that; the structures must not overlap)."""
SPACED_KINDS = tuple(f"spaced{n}" for n in range(2, 10))
"""Slice kinds ``spacedN`` (N = 2 to 9): one structure per episode, labelled on N slices spread evenly over its
extent (:func:`spaced_slices`), the way a user labels every few slices."""
ALL_SLICE_KINDS = (*SLICE_KINDS, EACH_LARGEST, UNION_LARGEST, *SPACED_KINDS)


@dataclass(frozen=True)
class ImageEpisode:
    """Episode ``index`` of a 2D set: a class, the target case and the reference cases (indices into cases)."""

    index: int
    class_name: str
    target: int
    references: tuple[int, ...]

    def episode_id(self, dataset: ImageDataset) -> str:
        refs = "+".join(dataset.cases[r].name for r in self.references)
        return f"{self.index:05d}:{self.class_name}:{dataset.cases[self.target].name}<-{refs}"


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global stream and ``random`` (the reference protocol seeds all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_image_episodes(dataset: ImageDataset, count: int, seed: int = 0, shots: int = 1) -> list[ImageEpisode]:
    """``count`` episodes drawn from numpy's global stream after :func:`seed_everything` (``seed``)."""
    if count < 0 or shots < 1:
        raise ValueError(f"episodes must be >= 0 and shots >= 1, got {count} and {shots}")
    seed_everything(seed)
    episodes = []
    for index in range(count):
        image_class = dataset.classes[index % len(dataset.classes)]
        pool = dataset.pools[image_class.name]
        target = int(np.random.choice(pool, 1, replace=False)[0])
        references: list[int] = []
        while len(references) < shots:
            reference = int(np.random.choice(pool, 1, replace=False)[0])
            if reference != target:
                references.append(reference)
        episodes.append(ImageEpisode(index, image_class.name, target, tuple(references)))
    return episodes


def select_cases(total: int, count: int | None, seed: int = 0) -> list[int]:
    """Indices of ``count`` of ``total`` cases (all when ``count`` is None or larger), ascending.

    The subset is the first ``count`` entries of a permutation seeded by ``seed``.
    """
    if count is None or count >= total:
        return list(range(total))
    if count < 0:
        raise ValueError(f"case count must be >= 0, got {count}")
    order = np.random.default_rng(seed).permutation(total)
    return sorted(int(i) for i in order[:count])


def labelled_slice(mask: np.ndarray, axis: int, kind: str, seed: int, case_index: int,
                   structure_index: int) -> int:
    """The slice index along ``axis`` that an episode labels: largest area, or a seeded random present slice."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    areas = np.count_nonzero(mask, axis=other)
    present = np.flatnonzero(areas)
    if present.size == 0:
        raise ValueError("the structure is absent from this volume")
    if kind in ("largest", EACH_LARGEST):
        return int(np.argmax(areas))
    if kind == "random":
        rng = np.random.default_rng([seed, case_index, structure_index])
        return int(present[rng.integers(present.size)])
    raise ValueError(f"unknown slice kind {kind!r}; choose from {ALL_SLICE_KINDS}")


def spaced_slices(mask: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` distinct slice indices along ``axis`` spread evenly over the extent of ``mask`` (first to last
    slice holding it): the centres of ``count`` equal parts of the extent, each moved to the nearest slice holding
    the structure; fewer when the extent holds fewer slices."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    present = np.flatnonzero(np.count_nonzero(mask, axis=other))
    if present.size == 0:
        raise ValueError("the structure is absent from this volume")
    first, length = int(present[0]), int(present[-1] - present[0] + 1)
    chosen: list[int] = []
    for part in range(count):
        centre = first + (part + 0.5) * length / count - 0.5
        for index in sorted(present.tolist(), key=lambda n: (abs(n - centre), n)):
            if index not in chosen:
                chosen.append(int(index))
                break
    return sorted(chosen)


def sample_pairs(total: int, count: int, seed: int = 0,
                 subjects: Sequence[str] | None = None, same_subject: bool = False) -> list[tuple[int, int]]:
    """``count`` ordered (reference, target) index pairs from a seeded permutation of all pairs of distinct cases
    of distinct ``subjects`` when given (two time frames of one patient never pair), or of the same subject when
    ``same_subject`` (only two time frames of one patient pair)."""
    subjects = list(subjects) if subjects is not None else [str(i) for i in range(total)]
    pairs = [(a, b) for a in range(total) for b in range(total)
             if a != b and (subjects[a] == subjects[b]) == same_subject]
    if not pairs:
        raise ValueError("transfer needs at least 2 cases of one subject (time frames)" if same_subject
                         else "transfer needs at least 2 cases of different subjects")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[int(i)] for i in order[: max(0, count)]]
