"""bf16 against fp32 on the evaluation harness's 2D episodes: mask agreement, accuracy of each, and speed.

    python benchmarks/bench_precision.py [--datasets ph2 cxr] [--episodes 40] [--size 448] [--model standin]
                                         [--threads N] [--json PATH]

Episodes are the harness's (``insid3_med.evaluation.episodes.sample_image_episodes``, seed 0, one shot) on the
labelled 2D sets in ../shared/data. Each episode is segmented by an fp32 backbone and by bf16 ones (same weights,
same segmenter settings): ``bf16`` (the library's path) and ``bf16-blocked`` (the same with the blocked bf16
attention of :func:`bench_backbone.blocked_attention`). Printed per dataset:
- the pooled IoU between each bf16 variant's and fp32's foreground masks (sum of intersections / sum of unions over
  episodes, at the images' own size), and the number of episodes whose masks are identical;
- the mIoU of each precision against the ground truth (per class, pooled; then the mean over classes, x 100);
- seconds per episode of each precision (encoding reference and target in one batch, then segmenting).
Volume sets (``--datasets acdc hippocampus brats``; ``--episodes``: volumes per set, the first ones by name) run
the library's default volume propagation (``propagate_through_slices``) from each structure's largest slice, with
the fp32 and the bf16 backbone: pooled IoU between the two outputs, 3D Dice of each against the labels, seconds.
Only the stand-in has meaningful features; random-weight models would compare noise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch
from bench_backbone import blocked_attention, swapped_attention

from insid3_med.evaluation.datasets import open_image_dataset, open_volume_dataset, read_mask, read_rgb_image
from insid3_med.evaluation.episodes import sample_image_episodes
from insid3_med.predictor import OneShotSegmenter
from insid3_med.volume import propagate_through_slices, take_slice

VOLUME_SETS = ("acdc", "hippocampus", "brats")


def predict(segmenter: OneShotSegmenter, reference: np.ndarray, mask: np.ndarray, target: np.ndarray,
            blocked: bool = False) -> np.ndarray:
    """(H, W) bool foreground of ``target`` from one reference shot (``blocked``: the blocked bf16 attention)."""
    with swapped_attention(blocked_attention) if blocked else contextlib.nullcontext():
        encoded = segmenter.encode([reference, target])
    segmenter.set_reference(encoded[0], mask.astype(np.int64))
    return segmenter.segment(encoded[1]) > 0


VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-blocked": ("bf16", True)}


def compare_dataset(name: str, episodes: int, segmenters: dict[str, OneShotSegmenter], variants: list[str]) -> dict:
    """Agreement and accuracy figures of one dataset (see the module docstring)."""
    dataset = open_image_dataset(common.SHARED / "data" / name)
    drawn = sample_image_episodes(dataset, episodes, seed=0)
    classes = {c.name: c for c in dataset.classes}
    agreement = {v: [0, 0, 0] for v in variants if v != "fp32"}  # intersection, union, identical episodes
    truth = {v: {c: [0, 0] for c in classes} for v in variants}
    seconds = {v: 0.0 for v in variants}
    for episode in drawn:
        image_class = classes[episode.class_name]
        target_case = dataset.cases[episode.target]
        reference_case = dataset.cases[episode.references[0]]
        reference = read_rgb_image(reference_case.image_path)
        mask = image_class.binary(read_mask(reference_case.mask_path))
        target = read_rgb_image(target_case.image_path)
        target_mask = image_class.binary(read_mask(target_case.mask_path))
        masks = {}
        for variant in variants:
            precision, blocked = VARIANTS[variant]
            start = time.perf_counter()
            masks[variant] = predict(segmenters[precision], reference, mask, target, blocked)
            seconds[variant] += time.perf_counter() - start
            counts = truth[variant][episode.class_name]
            counts[0] += int(np.count_nonzero(masks[variant] & target_mask))
            counts[1] += int(np.count_nonzero(masks[variant] | target_mask))
        for variant, counts in agreement.items():
            counts[0] += int(np.count_nonzero(masks["fp32"] & masks[variant]))
            counts[1] += int(np.count_nonzero(masks["fp32"] | masks[variant]))
            counts[2] += int(np.array_equal(masks["fp32"], masks[variant]))
    miou = {v: 100.0 * float(np.mean([i / u if u else 1.0 for i, u in per_class.values()]))
            for v, per_class in truth.items()}
    return {
        "dataset": name, "episodes": len(drawn),
        "pooled_iou_vs_fp32": {v: (i / u if u else 1.0) for v, (i, u, _) in agreement.items()},
        "identical_masks": {v: same for v, (_, _, same) in agreement.items()},
        "miou": miou,
        "seconds_per_episode": {v: s / max(1, len(drawn)) for v, s in seconds.items()},
    }


def compare_volumes(name: str, volumes: int, segmenters: dict[str, OneShotSegmenter]) -> dict:
    """fp32 against bf16 on the volume propagation of the first ``volumes`` volumes of a set (module docstring)."""
    dataset = open_volume_dataset(common.SHARED / "data" / name)
    agreement, same, episodes = [0, 0], 0, 0
    dice = {p: [] for p in segmenters}
    seconds = {p: 0.0 for p in segmenters}
    for case in dataset.cases[:volumes]:
        for structure in dataset.structures:
            volume = dataset.load_image(case, structure)
            truth = structure.binary(dataset.load_labels(case, volume))
            if not truth.any():
                continue
            axis = dataset.slice_axis(volume)
            other = tuple(a for a in range(3) if a != axis)
            index = int(np.argmax(np.count_nonzero(truth, axis=other)))
            labels = np.zeros(truth.shape, dtype=np.uint8)
            take_slice(labels, axis, index)[...] = take_slice(truth, axis, index)
            outputs = {}
            for precision, segmenter in segmenters.items():
                start = time.perf_counter()
                outputs[precision] = propagate_through_slices(segmenter, volume, labels, axis=axis) > 0
                seconds[precision] += time.perf_counter() - start
                total = outputs[precision].sum() + truth.sum()
                dice[precision].append(2.0 * float((outputs[precision] & truth).sum()) / total if total else 1.0)
            agreement[0] += int((outputs["fp32"] & outputs["bf16"]).sum())
            agreement[1] += int((outputs["fp32"] | outputs["bf16"]).sum())
            same += int(np.array_equal(outputs["fp32"], outputs["bf16"]))
            episodes += 1
    return {
        "dataset": name, "episodes": episodes,
        "pooled_iou_vs_fp32": {"bf16": agreement[0] / agreement[1] if agreement[1] else 1.0},
        "identical_masks": {"bf16": same},
        "dice": {p: float(np.mean(d)) if d else float("nan") for p, d in dice.items()},
        "seconds_per_episode": {p: t / max(1, episodes) for p, t in seconds.items()},
    }


def measure(datasets: list[str], episodes: int, size: int, model: str, variants: list[str]) -> dict:
    variants = ["fp32", *[v for v in variants if v != "fp32"]]
    segmenters = {p: OneShotSegmenter(common.load_model(model, p), image_size=size) for p in ("fp32", "bf16")}
    rows = []
    for name in datasets:
        if not (common.SHARED / "data" / name).is_dir():
            print(f"{name}: ../shared/data/{name} is absent, skipped", flush=True)
            continue
        if name in VOLUME_SETS:
            rows.append(compare_volumes(name, episodes, segmenters))
        else:
            rows.append(compare_dataset(name, episodes, segmenters, variants))
        print(report_row(rows[-1]), flush=True)
    lowest = {v: min((r["pooled_iou_vs_fp32"][v] for r in rows if v in r["pooled_iou_vs_fp32"]), default=float("nan"))
              for v in variants[1:]}
    return {"model": model, "size": segmenters["fp32"].image_size, "datasets": rows, "min_pooled_iou": lowest,
            "machine": common.machine("cpu")}


def report_row(row: dict) -> str:
    parts = [f"{row['dataset']:<6} {row['episodes']:>4} episodes:"]
    for variant, iou in row["pooled_iou_vs_fp32"].items():
        parts.append(f"  {variant} vs fp32: pooled IoU {iou:.4f}, identical masks "
                     f"{row['identical_masks'][variant]}/{row['episodes']}")
    scores = ("  mIoU " + ", ".join(f"{v} {m:.1f}" for v, m in row["miou"].items())) if "miou" in row else (
        "  3D Dice " + ", ".join(f"{v} {d:.3f}" for v, d in row["dice"].items()))
    parts.append(scores + "; s/episode " +
                 ", ".join(f"{v} {s:.2f}" for v, s in row["seconds_per_episode"].items()))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["ph2", "cxr"])
    parser.add_argument("--episodes", type=int, default=40, help="episodes per dataset")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--model", choices=common.MODEL_CHOICES, default="standin")
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "fp32"],
                        default=["bf16", "bf16-blocked"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model} at {args.size} px; machine: {common.describe_machine(common.machine('cpu'))}", flush=True)
    result = measure(args.datasets, args.episodes, args.size, args.model, args.variants)
    print("lowest pooled IoU vs fp32 (target >= 0.98): " +
          ", ".join(f"{v} {iou:.4f}" for v, iou in result["min_pooled_iou"].items()))
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
