"""The 3D random walk's variants, offline, and where the default's error lies.

    python benchmarks/walk_variants.py [--set hippocampus] [--volumes N] [--cache DIR] [--threads N] [--json PATH]

Runs the volume mode's chain as the evaluation harness does (the slice of largest area labelled, one structure per
episode, stand-in backbone, fp32, seed 0, the first ``--volumes`` volumes of the set's seeded order), with the walk
off, once per episode; then refines each chain's output with every variant of :data:`VARIANTS` (settings of
:class:`insid3_med.propagation.PropagationParams`, and how many times the walk runs) and scores it. The harness's
own figure for the same volumes is the ``default`` row. ``--cache`` keeps the chains' outputs (one ``.npz`` per
episode), so that a second run only walks.

Printed: per variant, the mean 3D Dice, per structure, and the difference to ``default``; for ``default``, where its
error lies: false negatives on slices the chain left empty (it stopped early) and on the slices it predicted,
false positives on slices beyond the structure and on the slices inside it, how many of those lie on another
labelled structure, and the Dice if the slices left empty had been predicted perfectly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

from insid3_med.evaluation.datasets import open_volume_dataset
from insid3_med.evaluation.episodes import labelled_slice, select_cases
from insid3_med.evaluation.methods import build_method
from insid3_med.evaluation.metrics import dice
from insid3_med.evaluation.report import atomic_write, write_text
from insid3_med.imaging.intensity import intensity_mapping
from insid3_med.propagation import PropagationParams
from insid3_med.volume import SliceStack, refine_volume_boundaries, take_slice

# name -> (PropagationParams overrides, passes of the walk)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "no_walk": ({"random_walk_beta": None}, 0),
    "default": ({}, 1),
    "two_passes": ({}, 2),
    "three_passes": ({}, 3),
    "beta_80": ({"random_walk_beta": 80.0}, 1),
    "beta_200": ({"random_walk_beta": 200.0}, 1),
    "band_2": ({"random_walk_band": 2}, 1),
}


def refine(chain: np.ndarray, stack: SliceStack, keep: list[int], overrides: dict[str, Any],
           passes: int) -> np.ndarray:
    """The (K, J, I) ``chain`` refined ``passes`` times by the walk with ``overrides`` (each pass calibrated on
    the kept slices, as the pipeline's one pass is)."""
    params = dataclasses.replace(PropagationParams(), **overrides)
    labels = chain.copy()
    for _ in range(passes):
        labels = refine_volume_boundaries(labels, stack, keep, params)
    return labels


def error_parts(predicted: np.ndarray, truth: np.ndarray, others: np.ndarray, axis: int) -> dict[str, int]:
    """Voxel counts of where a (K, J, I) boolean prediction errs against ``truth``; ``others``: the voxels of the
    other labelled structures."""
    plane = tuple(a for a in range(3) if a != axis)
    shape = [truth.shape[axis] if a == axis else 1 for a in range(3)]
    predicted_slices = np.any(predicted, axis=plane).reshape(shape)
    true_slices = np.any(truth, axis=plane).reshape(shape)
    false_negative, false_positive = truth & ~predicted, predicted & ~truth
    return {
        "true_positive": int(np.count_nonzero(predicted & truth)),
        "fn_on_slices_left_empty": int(np.count_nonzero(false_negative & ~predicted_slices)),
        "fn_on_predicted_slices": int(np.count_nonzero(false_negative & predicted_slices)),
        "fp_beyond_the_structure": int(np.count_nonzero(false_positive & ~true_slices)),
        "fp_inside_its_slices": int(np.count_nonzero(false_positive & true_slices)),
        "fp_on_another_structure": int(np.count_nonzero(false_positive & others)),
    }


def _save_chain(path: Path, chain: np.ndarray) -> None:
    with path.open("wb") as file:  # a file object: numpy adds no ".npz" to the temporary name
        np.savez_compressed(file, chain=chain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="hippocampus", help="a volume set under ../shared/data (default hippocampus)")
    parser.add_argument("--volumes", type=int, default=None, help="first N volumes of the seeded order (default all)")
    parser.add_argument("--cache", type=Path, default=None, help="keep the chains' outputs here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    data = common.SHARED / "data" / args.set
    for path, what in ((data, "data set"), (common.STANDIN, "stand-in weights")):
        if not path.exists():
            print(f"skipped: the {what} is not at {path}")
            return 0
    torch.set_num_threads(args.threads)
    dataset = open_volume_dataset(data)
    method = build_method("ours", backbone_options={"weights": str(common.STANDIN), "device": "cpu"},
                          propagation=PropagationParams(random_walk_beta=None))
    scores: dict[str, list[float]] = {name: [] for name in VARIANTS}
    structures: list[str] = []
    parts: dict[str, int] = {}
    default_if_filled: list[float] = []
    for case_number in select_cases(len(dataset.cases), args.volumes, 0):
        case = dataset.cases[case_number]
        for structure_number, structure in enumerate(dataset.structures):
            volume = dataset.load_image(case, structure)
            labels = dataset.load_labels(case, volume)
            axis = dataset.slice_axis(volume)
            truth = structure.binary(labels)
            if not truth.any():
                continue
            index = labelled_slice(truth, axis, "largest", 0, case_number, structure_number)
            given = np.zeros(truth.shape, dtype=np.int64)
            take_slice(given, axis, index)[...] = take_slice(truth, axis, index)
            cached = None if args.cache is None else args.cache / f"{case.name}_{structure_number}.npz"
            if cached is not None and cached.is_file():
                chain = np.load(cached)["chain"]
            else:
                chain = method.propagate(volume, given, axis)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(cached, lambda path, chain=chain: _save_chain(path, chain))
            stack = SliceStack(volume, axis, intensity_mapping(volume))
            structures.append(structure.name)
            for name, (overrides, passes) in VARIANTS.items():
                predicted = refine(chain, stack, [index], overrides, passes) != 0
                scores[name].append(dice(predicted, truth))
                if name == "default":
                    others = (labels != 0) & ~truth
                    for key, count in error_parts(predicted, truth, others, axis).items():
                        parts[key] = parts.get(key, 0) + count
                    plane = tuple(a for a in range(3) if a != axis)
                    left_empty = ~np.any(predicted, axis=plane)
                    filled = predicted.copy()
                    np.moveaxis(filled, axis, 0)[left_empty] = np.moveaxis(truth, axis, 0)[left_empty]
                    default_if_filled.append(dice(filled, truth))
            print(f"{case.name} {structure.name}: " + " ".join(f"{n} {s[-1]:.3f}" for n, s in scores.items()),
                  file=sys.stderr, flush=True)
    names = sorted(set(structures), key=structures.index)
    rows = []
    print(f"{args.set}: {len(structures)} episodes")
    for name, values in scores.items():
        mean = float(np.mean(values))
        pairs = list(zip(values, structures, strict=True))
        per_structure = {s: float(np.mean([v for v, t in pairs if t == s])) for s in names}
        delta = mean - float(np.mean(scores["default"]))
        rows.append({"variant": name, "settings": VARIANTS[name][0], "passes": VARIANTS[name][1], "dice": mean,
                     "dice_vs_default": delta, "structures": per_structure})
        print(f"  {name:14s} {mean:.4f} ({delta:+.4f})  " + ", ".join(f"{s} {v:.4f}" for s, v in per_structure.items()))
    print("  default's errors (voxels): " + ", ".join(f"{k} {v}" for k, v in parts.items()))
    print(f"  default with the slices it left empty predicted perfectly: {np.mean(default_if_filled):.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {"set": args.set, "episodes": len(structures), "variants": rows, "default_errors": parts,
                   "default_if_empty_slices_perfect": float(np.mean(default_if_filled))}
        write_text(args.json, json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
