"""Time of each stage of a 2D one-shot episode, the backbone's FLOP/s against a matmul, and slices per second.

    python benchmarks/bench_stages.py [--model standin|dinov3_vits16|dinov3_vitb16|dinov3_vitl16] [--size 448]
                                      [--precision fp32|bf16] [--device cpu|cuda] [--repeats 3] [--slices 4]
                                      [--batch 4] [--threads N] [--json PATH]

One episode = one reference image with its mask and one target image (PH2 dermoscopy pair from ../shared/data, or
a synthetic pair where that is absent), run stage by stage with the library's own functions, the same calls the
``OneShotSegmenter`` makes (the result is checked against ``segmenter.segment``):

- resize: image to tensor, resize to s x s, normalisation; and at the end the mask back to the image's size;
- encode: the backbone on reference and target in one batch;
- basis: the positional basis lookup (cached per backbone and size; its first computation is timed apart);
- debias: flattening, normalisation and projection of the positional basis;
- candidates: reference mask to the patch grid, prototype, forward and backward tests;
- clustering: average linkage of the target's patches;
- merge: seed, cluster scores, merge, overlap resolution.

Printed: best (minimum over ``--repeats``) seconds per stage and its share of the episode; the backbone's FLOP count
(matrix products of the blocks actually run) and achieved FLOP/s as a fraction of a square matmul of the same
precision and of about the size of the MLP product: each episode's encoding against the mean of the matmul rates
sustained just before and after it (over a quarter of the backbone's FLOPs), the median over repeats (the machine
may be shared: paired figures see the same load); slices per second,
from the stages (half the episode's encoding, resizing and debiasing plus the per-target stages) and, with
``--slices``, measured (targets against the same reference, encoded ``--batch`` at a time); peak memory.
Random-weight DINOv3 models give honest timings but meaningless features, so their clustering stage is not
representative; the stand-in's is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

from insid3_med.clustering import average_linkage_clusters
from insid3_med.engine import (
    ReferenceShot,
    candidates,
    debias,
    flatten_features,
    labels_from_masks,
    mask_to_patch_grid,
    prototype,
    resolve_overlaps,
    seed_and_merge,
    upsample_masks,
)
from insid3_med.predictor import EncodedImage, OneShotSegmenter, image_to_tensor

STAGES = ("resize", "encode", "basis", "debias", "candidates", "clustering", "merge")


def episode_images(count: int = 2) -> tuple[list[np.ndarray], np.ndarray, str]:
    """``count`` RGB uint8 images (the first is the reference) and the reference's (H, W) mask, and their source."""
    folder = common.SHARED / "data" / "ph2"
    images = sorted((folder / "images").glob("*.jpg"))
    if len(images) >= count:
        from PIL import Image

        chosen = images[:count]
        arrays = [np.asarray(Image.open(path).convert("RGB")) for path in chosen]
        mask = np.asarray(Image.open(folder / "masks" / f"{chosen[0].stem}_lesion.png")) > 0
        return arrays, mask.astype(np.int64), f"PH2 {', '.join(p.stem for p in chosen)}"
    rng = np.random.default_rng(0)
    arrays, mask = [], None
    rows, cols = np.mgrid[:570, :765]
    for index in range(count):
        centre = (285 + 20 * index, 380 - 15 * index)
        disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < (150 + 5 * index) ** 2
        image = rng.normal(170, 20, (570, 765, 3))
        image[disc] = rng.normal(90, 15, (int(disc.sum()), 3))
        arrays.append(np.clip(image, 0, 255).astype(np.uint8))
        mask = disc.astype(np.int64) if mask is None else mask
    return arrays, mask, "synthetic discs (../shared/data/ph2 absent)"  # type: ignore[return-value]


def run_episode(segmenter: OneShotSegmenter, reference: np.ndarray, mask: np.ndarray, target: np.ndarray,
                timer: common.StageTimer) -> tuple[np.ndarray, EncodedImage, EncodedImage]:
    """One episode stage by stage: the target's (H, W) label map, and the encoded reference and target."""
    backbone, params = segmenter.backbone, segmenter.params
    with timer.stage("resize"):
        tensors = [image_to_tensor(reference), image_to_tensor(target)]
        batch = torch.stack([segmenter.prepare(tensor) for tensor in tensors])
    with timer.stage("encode"):
        maps = backbone.encode(batch, batch_size=batch.shape[0])
    with timer.stage("basis"):
        basis = segmenter.basis()
    with timer.stage("debias"):
        plain = [flatten_features(feature_map) for feature_map in maps]
        debiased = [debias(features, basis) for features in plain]
    grid = tuple(maps.shape[2:])
    with timer.stage("candidates"):
        labels = torch.as_tensor(mask).long()
        values = [int(v) for v in torch.unique(labels) if v > 0]
        references = [[ReferenceShot(debiased[0], mask_to_patch_grid(labels == v, grid).flatten().to(basis.device))]
                      for v in values]
        queries = [prototype(shots) for shots in references]
        chosen = [candidates(debiased[1], query, shots) for query, shots in zip(queries, references, strict=True)]
    with timer.stage("clustering"):
        clusters = average_linkage_clusters(plain[1], 1.0 - params.tau)
    with timer.stage("merge"):
        masks = [seed_and_merge(plain[1], debiased[1], query, clusters, candidate, params.merge_threshold)
                 for query, candidate in zip(queries, chosen, strict=True)]
        patches = resolve_overlaps(torch.stack(masks), debiased[1], torch.stack(queries))
    with timer.stage("resize"):  # what OneShotSegmenter.patch_masks_to_labels does for fit="stretch"
        size = tuple(target.shape[:2])
        upsampled = upsample_masks(patches, grid, segmenter.model_size, size)  # type: ignore[arg-type]
        out = labels_from_masks(upsampled, values).cpu().numpy()
    encoded = [EncodedImage(p, d, grid, segmenter.model_size, tuple(image.shape[:2]))  # type: ignore[arg-type]
               for p, d, image in zip(plain, debiased, (reference, target), strict=True)]
    return out, encoded[0], encoded[1]


def throughput(segmenter: OneShotSegmenter, targets: list[np.ndarray], batch: int) -> float:
    """Seconds to segment ``targets`` (the reference already set), encoding ``batch`` at a time."""
    common.synchronise(segmenter.backbone.device)
    start = time.perf_counter()
    for first in range(0, len(targets), batch):
        for encoded in segmenter.encode(targets[first : first + batch], batch_size=batch):
            segmenter.segment(encoded)
    common.synchronise(segmenter.backbone.device)
    return time.perf_counter() - start


def measure(model: str, size: int, precision: str, device: str, repeats: int, slices: int, batch: int,
            warmup: bool = True) -> dict:
    """Every figure of one configuration, as a dict (see the module docstring)."""
    start = time.perf_counter()
    backbone = common.load_model(model, precision, device)
    load_seconds = time.perf_counter() - start
    rss_loaded = common.current_rss_mib()
    segmenter = OneShotSegmenter(backbone, image_size=size)
    side = segmenter.image_size
    images, mask, source = episode_images()
    reference, target = images

    basis_first = common.best_of(segmenter.basis, 1, device)  # computes and caches the basis
    timer = common.StageTimer(device)
    if warmup:
        run_episode(segmenter, reference, mask, target, common.StageTimer(device))
    yardstick = common.MatmulYardstick(common.yardstick_side(backbone.spec, side, 2), precision, device)
    flops = common.backbone_flops(backbone.spec, side, backbone.feature_block, batch=2)
    # Matmul rates sustained over a quarter of the backbone's FLOPs, before, between and after the episodes.
    rates = [yardstick.sustained_rate(flops / 4)]
    for _ in range(repeats):
        labels, encoded_reference, encoded_target = run_episode(segmenter, reference, mask, target, timer)
        timer.end_repeat()
        rates.append(yardstick.sustained_rate(flops / 4))
    encode_times = timer.samples["encode"]
    paired = [flops / seconds / ((rates[r] + rates[r + 1]) / 2) for r, seconds in enumerate(encode_times)]

    segmenter.set_reference(encoded_reference, mask)
    if not np.array_equal(segmenter.segment(encoded_target), labels):
        raise SystemExit("the stage-by-stage episode differs from OneShotSegmenter.segment: the benchmark is stale")

    best = timer.best()
    total = sum(best.values())
    achieved = flops / best["encode"]
    matmul = max(rates)
    # One more target slice costs half the batch's encoding and resizing, and every per-target stage.
    per_slice = (best["encode"] + best["resize"] + best["debias"]) / 2 + sum(
        best[name] for name in ("candidates", "clustering", "merge"))
    result: dict = {
        "model": model, "backbone": backbone.spec.name, "feature_block": backbone.feature_block, "size": side,
        "precision": precision, "device": device, "repeats": repeats, "images": source,
        "grid": [side // backbone.patch_size] * 2,
        "stage_seconds": {name: best.get(name, 0.0) for name in STAGES},
        "stage_seconds_median": {name: timer.median().get(name, 0.0) for name in STAGES},
        "episode_seconds": total,
        "non_backbone_fraction": (total - best["encode"]) / total,
        "basis_first_seconds": basis_first,
        "backbone_gflop": flops / 1e9,
        "backbone_gflops": achieved / 1e9,
        "matmul_side": yardstick.n,
        "matmul_gflops": matmul / 1e9,
        "matmul_gflops_all": [r / 1e9 for r in rates],
        "backbone_fraction_of_matmul": statistics.median(paired),
        "backbone_fraction_of_matmul_per_repeat": paired,
        "backbone_fraction_best_over_best": achieved / matmul,
        "slices_per_second_from_episode": 1.0 / per_slice,
        "load_seconds": load_seconds,
        "rss_after_load_mib": rss_loaded,
        "foreground_fraction": float((labels > 0).mean()),
    }
    if slices > 0:
        targets = [target] * slices
        if warmup:
            throughput(segmenter, targets[:batch], batch)  # warm-up at the batch shape
        seconds = throughput(segmenter, targets, batch)
        result.update({"slices": slices, "batch": batch, "slices_per_second": slices / seconds})
    result["peak_rss_mib"] = common.peak_rss_mib()
    if torch.device(device).type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["machine"] = common.machine(device)
    return result


def report(result: dict) -> str:
    """The figures of :func:`measure` as text."""
    lines = [
        f"{result['model']} ({result['backbone']}, block {result['feature_block']}) at {result['size']} px "
        f"(grid {result['grid'][0]}x{result['grid'][1]}), {result['precision']}, {result['device']}; "
        f"{result['images']}; best of {result['repeats']}",
        f"machine: {common.describe_machine(result['machine'])}",
        f"{'stage':<12}{'seconds':>10}{'median':>10}{'share':>8}",
    ]
    total = result["episode_seconds"]
    for name in STAGES:
        seconds = result["stage_seconds"][name]
        lines.append(f"{name:<12}{seconds:>10.4f}{result['stage_seconds_median'][name]:>10.4f}"
                     f"{100 * seconds / total:>7.1f}%")
    lines += [
        f"{'episode':<12}{total:>10.4f}   everything but the backbone: {100 * result['non_backbone_fraction']:.1f}%",
        f"basis, first computation: {result['basis_first_seconds']:.3f} s (once per backbone and size)",
        f"backbone: {result['backbone_gflop']:.1f} GFLOP for 2 images, best {result['backbone_gflops']:.1f} GFLOP/s; "
        f"{100 * result['backbone_fraction_of_matmul']:.0f}% of a {result['matmul_side']}^2 {result['precision']} "
        f"matmul (median over repeats of each episode against the matmul rates around it: "
        f"{', '.join(f'{100 * r:.0f}%' for r in result['backbone_fraction_of_matmul_per_repeat'])}; best against "
        f"best {100 * result['backbone_fraction_best_over_best']:.0f}%; matmul GFLOP/s "
        f"{', '.join(f'{r:.0f}' for r in result['matmul_gflops_all'])})",
    ]
    throughput_text = f"throughput: {result['slices_per_second_from_episode']:.2f} slices/s from the episode's stages"
    if "slices_per_second" in result:
        throughput_text += (f"; measured {result['slices_per_second']:.2f} slices/s ({result['slices']} targets, "
                            f"batches of {result['batch']})")
    lines.append(throughput_text)
    memory = f"memory: peak RSS {result['peak_rss_mib']:.0f} MiB (after loading {result['rss_after_load_mib']:.0f})"
    if "peak_gpu_mib" in result:
        memory += f", peak GPU {result['peak_gpu_mib']:.0f} MiB"
    lines.append(memory)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=common.MODEL_CHOICES, default="standin")
    parser.add_argument("--size", type=int, default=448, help="model input side s (rounded to the patch size)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=0, help="targets of a measured throughput run (0: none)")
    parser.add_argument("--batch", type=int, default=4, help="targets encoded per backbone call")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up episode (large models)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.size, args.precision, args.device, args.repeats, args.slices, args.batch,
                     warmup=not args.no_warmup)
    print(report(result), flush=True)
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
