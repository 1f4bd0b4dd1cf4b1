"""Ways of running the backbone on this machine: speed, FLOP/s against a matmul, and agreement with fp32.

    python benchmarks/bench_backbone.py [--model standin|dinov3_vits16|...] [--size 448] [--batch 2]
                                        [--repeats 3] [--device cpu] [--compile] [--threads N] [--json PATH]

Variants (each on the same ``--batch`` images of side ``--size``):
- fp32: the library's fp32 path (torch's fused attention, ``F.scaled_dot_product_attention``);
- bf16 autocast: fp32 weights cast by autocast on every call (the library's bf16 path before it held its matrix
  weights in bf16; bit-identical results);
- bf16 (library): matrix weights held in bf16, autocast; torch's fused attention below
  ``backbones.BLOCKED_ATTENTION_MIN_TOKENS`` tokens, blocked bf16 attention from there on;
- bf16, blocked attention / bf16, fused attention: the same with one attention forced at every length;
- bf16 everything: the whole network and its input in bf16 (residual stream and norms too), no autocast;
- bf16 (library), channels-last input: the patch-embedding convolution on a channels-last tensor;
- with ``--compile``: ``torch.compile`` of the library's fp32 and bf16 networks (compile time in "first").

The variants run round-robin, ``--repeats`` rounds (a change of load hits them all alike). Per variant: best
seconds per batch, GFLOP/s, the fraction of a square matmul of the variant's precision measured in the same rounds,
and the cosine between its features and fp32's (mean and minimum over patches).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import common
import torch
import torch.nn.functional as F

import insid3_med.backbones as backbones

blocked_attention = backbones.blocked_attention
"""bf16 attention by blocks of queries (bf16 logits): the library's bf16 CPU path from
``backbones.BLOCKED_ATTENTION_MIN_TOKENS`` tokens on, forced at every length by the "blocked" variants."""


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """torch's fused kernel at every length (the library's bf16 path below the blocked threshold)."""
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


@contextlib.contextmanager
def swapped_attention(function: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Run the library's networks with ``function`` in place of ``insid3_med.backbones.attention``."""
    own = backbones.attention
    backbones.attention = function
    try:
        yield
    finally:
        backbones.attention = own


Encoder = Callable[[torch.Tensor], torch.Tensor]


def variants(model: str, device: str, compile_too: bool) -> dict[str, tuple[str, Encoder]]:
    """name -> (precision, images -> (B, C, h, w) float32 features)."""
    fp32 = common.load_model(model, "fp32", device)
    bf16 = common.load_model(model, "bf16", device)
    autocast_only = common.load_model(model, "fp32", device)  # fp32 weights, run under bf16 autocast by hand
    whole = common.load_model(model, "fp32", device)
    whole.network.to(torch.bfloat16)
    blocks = fp32.feature_block

    def under_autocast(backbone: backbones.Backbone) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                return backbone.network(images.to(device), num_blocks=blocks).float()
        return run

    def with_attention(run: Encoder, function: Callable[..., torch.Tensor]) -> Encoder:
        def swapped(images: torch.Tensor) -> torch.Tensor:
            with swapped_attention(function):
                return run(images)
        return swapped

    def all_bf16(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return whole.network(images.to(device, torch.bfloat16), num_blocks=blocks).float()

    table = {
        "fp32": ("fp32", lambda images: fp32.encode(images, batch_size=images.shape[0])),
        "bf16 autocast": ("bf16", under_autocast(autocast_only)),
        "bf16 (library)": ("bf16", lambda images: bf16.encode(images, batch_size=images.shape[0])),
        "bf16, blocked attention": ("bf16", with_attention(lambda images: bf16.encode(
            images, batch_size=images.shape[0]), blocked_attention)),
        "bf16, fused attention": ("bf16", with_attention(lambda images: bf16.encode(
            images, batch_size=images.shape[0]), fused_attention)),
        "bf16 everything": ("bf16", all_bf16),
        "bf16 (library), channels-last": (
            "bf16", lambda images: bf16.encode(images.contiguous(memory_format=torch.channels_last),
                                               batch_size=images.shape[0])),
    }
    if compile_too:
        for name, backbone in (("fp32 compiled", fp32), ("bf16 compiled", bf16)):
            compiled = common.load_model(model, backbone.precision, device)
            compiled.network = torch.compile(compiled.network)
            table[name] = (backbone.precision, lambda images, c=compiled: c.encode(images, batch_size=images.shape[0]))
    return table


def measure(model: str, size: int, batch: int, repeats: int, device: str, compile_too: bool) -> dict:
    table = variants(model, device, compile_too)
    spec = common.load_model(model, "fp32", device).spec
    side = max(spec.patch_size, round(size / spec.patch_size) * spec.patch_size)
    blocks = spec.default_block
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, side, side, generator=generator)
    reference = table["fp32"][1](images)
    flops = common.backbone_flops(spec, side, blocks, batch)
    yardsticks = {p: common.MatmulYardstick(common.yardstick_side(spec, side, batch), p, device)
                  for p in ("fp32", "bf16")}
    first_call, agreement = {}, {}
    for name, (_, run) in table.items():
        start = time.perf_counter()
        features = run(images)  # warm-up (and compilation)
        first_call[name] = time.perf_counter() - start
        agreement[name] = F.cosine_similarity(features, reference, dim=1)
    # Round-robin over the variants, so that a change of the machine's load hits them all alike.
    seconds = {name: math.inf for name in table}
    rates = {precision: 0.0 for precision in yardsticks}
    for _ in range(repeats):
        for precision, yardstick in yardsticks.items():
            rates[precision] = max(rates[precision], yardstick.rate())
        for name, (_, run) in table.items():
            seconds[name] = min(seconds[name], common.best_of(lambda run=run: run(images), 1, device))
    rows = []
    for name, (precision, _) in table.items():
        rate, cosine = rates[precision], agreement[name]
        rows.append({
            "variant": name, "precision": precision, "seconds": seconds[name], "first_call_seconds": first_call[name],
            "gflops": flops / seconds[name] / 1e9, "matmul_gflops": rate / 1e9,
            "fraction_of_matmul": flops / seconds[name] / rate,
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        })
    return {"model": model, "backbone": spec.name, "size": side, "batch": batch, "blocks": blocks,
            "gflop": flops / 1e9, "device": device, "repeats": repeats, "variants": rows,
            "machine": common.machine(device)}


def report(result: dict) -> str:
    lines = [
        f"{result['model']} ({result['backbone']}, {result['blocks']} blocks) at {result['size']} px, batch "
        f"{result['batch']}: {result['gflop']:.1f} GFLOP; {result['device']}; best of {result['repeats']}",
        f"machine: {common.describe_machine(result['machine'])}",
        f"{'variant':<32}{'s/batch':>9}{'first':>8}{'GFLOP/s':>9}{'matmul':>8}{'of mm':>7}{'cos mean':>10}"
        f"{'cos min':>9}",
    ]
    for row in result["variants"]:
        lines.append(
            f"{row['variant']:<32}{row['seconds']:>9.3f}{row['first_call_seconds']:>8.1f}{row['gflops']:>9.1f}"
            f"{row['matmul_gflops']:>8.1f}{100 * row['fraction_of_matmul']:>6.0f}%{row['cosine_mean']:>10.5f}"
            f"{row['cosine_min']:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=common.MODEL_CHOICES, default="standin")
    parser.add_argument("--size", type=int, default=448, help="input side (a multiple of the patch size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.model, args.size, args.batch, args.repeats, args.device, args.compile)
    print(report(result), flush=True)
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
