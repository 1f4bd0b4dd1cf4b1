"""Run the stage benchmark over backbones, input sizes and precisions, one fresh process each, and tabulate.

    python benchmarks/run_suite.py [--device cpu|cuda] [--models standin dinov3_vits16 ...] [--sizes 448 512 1024]
                                   [--precisions fp32 bf16] [--repeats 2] [--slices 0] [--out reports/performance/cpu]
                                   [--force] [--table-only]

Each configuration runs ``bench_stages.py`` in its own process (so its peak memory is its own) and leaves
``<out>/stages_<model>_<size>_<precision>.json``; existing files are kept unless ``--force`` (an interrupted suite
resumes). Then ``<out>/table.md`` is written: per configuration, the best stage times (seconds) of one 2D episode
(reference and target), the share of everything but the backbone, the backbone's best GFLOP/s and its fraction of
a same-precision matmul (median of paired measurements; the best matmul rate in brackets), slices per second
(measured with ``--slices``, else estimated from the stages) and the process's peak memory.

On a GPU machine: ``python benchmarks/run_suite.py --device cuda --models dinov3_vits16 dinov3_vitb16 dinov3_vitl16
--sizes 512 1024 --precisions bf16 fp32 --slices 32 --out reports/performance/gpu``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
NAMES = {"standin": "DINOv2 ViT-S/14 stand-in (block 9)", "dinov3_vits16": "DINOv3 ViT-S/16 (random)",
         "dinov3_vitb16": "DINOv3 ViT-B/16 (random)", "dinov3_vitl16": "DINOv3 ViT-L/16 (random)"}


def result_path(out: Path, model: str, size: int, precision: str) -> Path:
    return out / f"stages_{model}_{size}_{precision}.json"


def run_one(args: argparse.Namespace, model: str, size: int, precision: str) -> None:
    path = result_path(args.out, model, size, precision)
    if path.exists() and not args.force:
        print(f"{path.name}: kept", flush=True)
        return
    command = [sys.executable, str(HERE / "bench_stages.py"), "--model", model, "--size", str(size),
               "--precision", precision, "--device", args.device, "--repeats", str(args.repeats),
               "--slices", str(args.slices), "--batch", str(args.batch), "--json", str(path)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.no_warmup_above and size >= args.no_warmup_above:
        command.append("--no-warmup")
    print(" ".join(command[1:]), flush=True)
    done = subprocess.run(command, check=False, text=True, capture_output=True)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        print(f"FAILED ({done.returncode}):\n{done.stderr[-3000:]}", flush=True)


def table(results: list[dict]) -> str:
    """Markdown table of bench_stages results."""
    header = ("| backbone | s | precision | resize | encode | basis | debias | candidates | clustering | merge | "
              "episode s | not backbone | backbone GFLOP/s | of matmul (GFLOP/s) | slices/s | peak RSS MiB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        stages = r["stage_seconds"]
        slices = (f"{r['slices_per_second']:.2f}" if "slices_per_second" in r
                  else f"{r['slices_per_second_from_episode']:.2f} (est.)")
        memory = f"{r['peak_rss_mib']:.0f}" + (f" (GPU {r['peak_gpu_mib']:.0f})" if "peak_gpu_mib" in r else "")
        lines.append(
            f"| {NAMES.get(r['model'], r['model'])} | {r['size']} | {r['precision']} | "
            + " | ".join(f"{stages[name]:.3f}" for name in
                         ("resize", "encode", "basis", "debias", "candidates", "clustering", "merge"))
            + f" | {r['episode_seconds']:.2f} | {100 * r['non_backbone_fraction']:.1f}% | {r['backbone_gflops']:.0f} | "
            f"{100 * r['backbone_fraction_of_matmul']:.0f}% (mm {r['matmul_gflops']:.0f}) | {slices} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", choices=common.MODEL_CHOICES,
                        default=["standin", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 512, 1024])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slices", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-warmup-above", type=int, default=1024,
                        help="skip the warm-up episode at and above this size (default 1024; 0: never skip)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "reports" / "performance" / "cpu")
    parser.add_argument("--force", action="store_true", help="rerun configurations that have results")
    parser.add_argument("--table-only", action="store_true", help="only rebuild table.md from the results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for model in args.models:
            for size in args.sizes:
                for precision in args.precisions:
                    run_one(args, model, size, precision)
    results = []
    for model in args.models:
        for size in args.sizes:
            for precision in args.precisions:
                path = result_path(args.out, model, size, precision)
                if path.exists():
                    results.append(json.loads(path.read_text()))
    if not results:
        print("no results to tabulate")
        return 1
    text = table(results)
    machines = sorted({common.describe_machine({**r["machine"], "load_average": "L"}) for r in results})
    loads = [r["machine"]["load_average"][0] for r in results]
    body = "\n".join(["Machine: " + "; ".join(machines).replace("load L", "load (1 min) "
                       f"{min(loads):.1f} to {max(loads):.1f} over the runs"), "", text, ""])
    temporary = args.out / ".table.md.tmp"
    temporary.write_text(body)
    temporary.replace(args.out / "table.md")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
