"""Could a stop rule tell the first slice beyond a structure from the slices inside it? Signals per chain step.

    python benchmarks/stop_signals.py [--set acdc] [--volumes N] [--threads N] [--json PATH]

Runs the volume mode as the evaluation harness does (the slice of largest area labelled, one structure per
episode, stand-in backbone, fp32, seed 0) and records, at every step of the chain, what a stop rule could look at:

- ``feature_change_crop``: mean cosine similarity of each patch's features to the same patch on the previous slice;
- ``feature_change_structure``: the same over the patches the previous slice's structure covers;
- ``similarity_to_labelled``: mean, over the patches predicted as the structure, of their best cosine similarity
  to the labelled slice's structure patches;
- ``confidence``: the mean decision confidence over the predicted structure (what the confidence stop uses);
- ``grey_correlation``: correlation of the grey values with the previous slice, in a box twice the labelled
  structure's size.

Steps are split into those that land inside the structure's true extent and the exits (the first slice beyond
it). Printed per signal: percentiles of the inside steps and how many exits fall below their 5th and 10th
percentile (a rule that stops there would cut about 5% / 10% of the inside steps). The steps are recorded by
wrapping :func:`insid3_med.propagation.label_slice` for the run; nothing in the method changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
import torch.nn.functional as F

import insid3_med.propagation as propagation
from insid3_med.evaluation.datasets import open_volume_dataset
from insid3_med.evaluation.episodes import labelled_slice, select_cases
from insid3_med.evaluation.methods import build_method
from insid3_med.evaluation.tasks import SliceTask, _only_slice

SIGNALS = ("feature_change_crop", "feature_change_structure", "similarity_to_labelled", "confidence",
           "grey_correlation")


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


class StepRecorder:
    """Wraps the chain so that each labelled slice's step signals are kept (slice index -> signals)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}
        self._index = -1
        self._chain = propagation._propagate_chain
        self._label_slice = propagation.label_slice

    def __enter__(self) -> StepRecorder:
        def chain(anchors: Any, features: Any, *args: Any, **kwargs: Any) -> Any:
            def indexed(index: int) -> torch.Tensor:
                self._index = index
                return features(index)

            return self._chain(anchors, indexed, *args, **kwargs)

        def label_slice(target: torch.Tensor, context: Any, values: Any, grid: tuple[int, int], *args: Any,
                        **kwargs: Any) -> np.ndarray:
            labels = self._label_slice(target, context, values, grid, *args, **kwargs)
            self.steps[self._index] = self._signals(target, context, grid, labels, kwargs.get("confidence"))
            return labels

        propagation._propagate_chain = chain
        propagation.label_slice = label_slice
        return self

    def __exit__(self, *exc: object) -> None:
        propagation._propagate_chain = self._chain
        propagation.label_slice = self._label_slice

    @staticmethod
    def _signals(target: torch.Tensor, context: Any, grid: tuple[int, int], labels: np.ndarray,
                 confidence: list[np.ndarray] | None) -> dict[str, float]:
        anchor, previous = context[0], context[-1]
        same_place = (target * previous.features).sum(dim=1)  # (N,)
        previous_structure = previous.labels[:, 1:].sum(dim=1) > 0.5
        anchor_structure = anchor.labels[:, 1:].sum(dim=1) > 0.5
        predicted = F.adaptive_avg_pool2d(torch.from_numpy(labels > 0).float()[None, None], grid).flatten() > 0.5
        nan = float("nan")
        return {
            "feature_change_crop": float(same_place.mean()),
            "feature_change_structure": float(same_place[previous_structure].mean()) if previous_structure.any()
            else nan,
            "similarity_to_labelled": float((target[predicted] @ anchor.features[anchor_structure].T).max(1).values
                                            .mean()) if predicted.any() and anchor_structure.any() else nan,
            "confidence": float(confidence[-1][labels > 0].mean()) if confidence and np.any(labels > 0) else nan,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="acdc", help="a volume set under ../shared/data (default acdc)")
    parser.add_argument("--volumes", type=int, default=None, help="first N volumes of the seeded order (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    data = common.SHARED / "data" / args.set
    weights = common.STANDIN
    for path, what in ((data, "data set"), (weights, "stand-in weights")):
        if not path.exists():
            print(f"skipped: the {what} is not at {path}")
            return 0
    torch.set_num_threads(args.threads)
    dataset = open_volume_dataset(data)
    method = build_method("ours", backbone_options={"weights": str(weights), "device": "cpu"})
    task = SliceTask(dataset, ("largest",))
    inside: list[dict[str, float]] = []
    exits: list[dict[str, Any]] = []
    for case_number in select_cases(len(dataset.cases), args.volumes, 0):
        case = dataset.cases[case_number]
        for structure_number, structure in enumerate(dataset.structures):
            volume, labels = task._cases.get(case, structure)
            axis = dataset.slice_axis(volume)
            truth = structure.binary(labels)
            if not truth.any():
                continue
            index = labelled_slice(truth, axis, "largest", 0, case_number, structure_number)
            with StepRecorder() as recorder:
                method.propagate(volume, _only_slice(truth, axis, index), axis)
            truth_k = np.moveaxis(truth, axis, 0)
            image = np.moveaxis(np.asarray(volume.array, dtype=np.float32), axis, 0)
            rows, cols = np.nonzero(truth_k[index])
            radius = max(np.ptp(rows), np.ptp(cols), 4)
            box = (slice(max(0, int(rows.mean() - radius)), int(rows.mean() + radius) + 1),
                   slice(max(0, int(cols.mean() - radius)), int(cols.mean() + radius) + 1))
            present = truth_k.reshape(truth_k.shape[0], -1).any(axis=1)
            for slice_index, signals in recorder.steps.items():
                step = -1 if slice_index < index else 1
                signals["grey_correlation"] = _correlation(image[slice_index][box], image[slice_index - step][box])
                if present[slice_index]:
                    inside.append(signals)
                elif present[slice_index - step]:
                    exits.append({**signals, "case": case.name, "structure": structure.name,
                                  "side": "lower" if step < 0 else "higher"})
            print(f"{case.name} {structure.name}: {len(recorder.steps)} steps", file=sys.stderr, flush=True)
    figures: dict[str, Any] = {"set": args.set, "inside_steps": len(inside), "exits": len(exits), "signals": {}}
    print(f"{args.set}: {len(inside)} steps inside the structure, {len(exits)} exits reached by the chain")
    for name in SIGNALS:
        values = np.array([s[name] for s in inside], dtype=float)
        at_exit = np.array([s[name] for s in exits], dtype=float)
        p2, p5, p10, p25, p50 = np.nanpercentile(values, [2, 5, 10, 25, 50])
        below5, below10 = int(np.sum(at_exit < p5)), int(np.sum(at_exit < p10))
        figures["signals"][name] = {"inside_percentiles": {"2": p2, "5": p5, "10": p10, "25": p25, "50": p50},
                                    "inside_min": float(np.nanmin(values)), "inside_mean": float(np.nanmean(values)),
                                    "exit_median": float(np.nanmedian(at_exit)),
                                    "exit_mean": float(np.nanmean(at_exit)),
                                    "exits_below_inside_p5": below5, "exits_below_inside_p10": below10}
        print(f"  {name:26s} inside p5 {p5:.3f} median {p50:.3f} | exit median {np.nanmedian(at_exit):.3f}; "
              f"exits below inside p5: {below5}/{len(exits)}, below p10: {below10}/{len(exits)}")
    figures["exit_sides"] = {side: sum(e["side"] == side for e in exits) for side in ("lower", "higher")}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**figures, "exit_steps": exits}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
