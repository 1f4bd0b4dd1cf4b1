"""Propagation through a volume: wall time once the model is loaded, slices per second, peak memory, cost per part.

    python benchmarks/bench_volume.py acdc [--case patient001_frame01] [--model standin] [--size 448]
    python benchmarks/bench_volume.py ct [--slices 300] [--side 512] [--model standin] [--size 512]
    python benchmarks/bench_volume.py ct --slices 100 300 [--json PATH]     # one subprocess per slice count
    common options: [--precision fp32|bf16] [--device cpu] [--mode M] [--crop-size S] [--set KEY=VALUE ...]
                    [--profile] [--threads N]

Both cases run ``insid3_med.volume.propagate_through_slices`` with its default mode and settings, from one labelled
slice (the labelled slice holding the most foreground; along array axis 0, the CLI's default ``k``):
- ``acdc``: a cardiac cine MRI of ../shared/data/acdc (256x216x10) with its right ventricle, myocardium and left
  ventricle; the time counts reading the image and label files and propagating (not loading the model);
- ``ct``: a synthetic CT of ``--slices`` slices of ``--side`` x ``--side`` voxels (int16 Hounsfield units: body,
  spine, kidneys, and a liver-like organ over the middle 60% of the slices that is labelled on its middle slice).
  Memory is measured in a fresh subprocess per slice count (peak resident set size); memory that does not grow
  with the number of slices shows as equal peaks once the volume's own arrays (image, labels in, labels out) are
  subtracted.

``--profile`` adds a second, profiled run (cProfile) and prints, per processed slice, the cumulative time of every
library function taking at least 1% of it (parts nest, for example the backbone inside a crop encoder, so they do
not add up), then the ten functions of any module with the most time of their own (torch operations, scipy...).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

from insid3_med.imaging.geometry import Geometry, Volume
from insid3_med.predictor import OneShotSegmenter
from insid3_med.volume import labelled_slices, propagate_through_slices

JSON_MARK = "FIGURES-JSON "
# --profile lists library functions above this share of the profiled run, and this many hot leaf functions.
PROFILE_MIN_SHARE = 0.01
PROFILE_LEAVES = 10


def synthetic_ct(slices: int, side: int, seed: int = 0) -> tuple[Volume, np.ndarray]:
    """A (slices, side, side) int16 CT in HU and its labels: 1 on the middle slice of the liver-like organ only."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:side, :side].astype(np.float32) / side
    body = ((rows - 0.5) / 0.38) ** 2 + ((cols - 0.5) / 0.45) ** 2 < 1
    spine = ((rows - 0.72) / 0.06) ** 2 + ((cols - 0.5) / 0.06) ** 2 < 1
    kidneys = (((rows - 0.62) / 0.07) ** 2 + ((np.abs(cols - 0.5) - 0.17) / 0.045) ** 2) < 1
    array = np.empty((slices, side, side), dtype=np.int16)
    labels = np.zeros((slices, side, side), dtype=np.uint8)
    first, last = int(0.2 * slices), int(0.8 * slices)
    middle = (first + last) // 2
    for k in range(slices):
        position = (k - first) / max(1, last - first)  # 0..1 across the organ
        image = np.full((side, side), -1000.0, dtype=np.float32)
        image[body] = 40.0
        image[spine] = 700.0
        image[kidneys] = 30.0
        if 0.0 <= position <= 1.0:
            radius = 0.6 + 0.4 * np.sin(np.pi * position)
            liver = ((rows - 0.45) / (0.2 * radius)) ** 2 + ((cols - 0.35) / (0.16 * radius)) ** 2 < 1
            image[liver] = 65.0
            if k == middle:
                labels[k][liver] = 1
        image += rng.normal(0.0, 15.0, (side, side)).astype(np.float32)
        array[k] = np.clip(image, -1024, 3071).astype(np.int16)
    volume = Volume(array, Geometry(spacing=(0.8, 0.8, 1.5)), modality="CT")
    return volume, labels


def acdc_case(case: str) -> tuple[Volume, np.ndarray]:
    from insid3_med.imaging.readers import read_label_volume, read_volume

    folder = common.SHARED / "data" / "acdc"
    image_path, label_path = folder / "images" / f"{case}.nii.gz", folder / "labels" / f"{case}.nii.gz"
    if not image_path.is_file():
        raise SystemExit(f"the ACDC case is not at {image_path}")
    volume = read_volume(image_path)
    return volume, read_label_volume(label_path, like=volume)


def one_labelled_slice(labels: np.ndarray, axis: int = 0) -> tuple[np.ndarray, int]:
    """Keep only the labelled slice with the most foreground along ``axis``: (labels, its index)."""
    counts = np.count_nonzero(labels, axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(counts))
    kept = np.zeros_like(labels)
    selection = [slice(None)] * 3
    selection[axis] = index
    kept[tuple(selection)] = labels[tuple(selection)]
    return kept, index


def profile_parts(profile: cProfile.Profile, slices: int, total: float) -> list[dict]:
    """From ``profile``: every insid3_med function taking at least ``PROFILE_MIN_SHARE`` of ``total`` seconds
    (cumulative: parts nest), then the ``PROFILE_LEAVES`` functions with the most time of their own (any module)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), (_, calls, _own, cumulative, _) in stats.items():
        path = filename.replace("\\", "/")
        if "insid3_med/" in path and cumulative >= PROFILE_MIN_SHARE * total:
            module = path.split("insid3_med/", 1)[1].removesuffix(".py").replace("/", ".")
            rows.append({"part": f"{module}.{function} (line {line})", "kind": "library, cumulative",
                         "seconds": cumulative, "calls": calls, "ms_per_slice": 1000.0 * cumulative / max(1, slices)})
    rows.sort(key=lambda row: -row["seconds"])
    leaves = sorted(stats.items(), key=lambda item: -item[1][2])[:PROFILE_LEAVES]
    for (filename, line, function), (_, calls, own, _, _) in leaves:
        where = Path(filename).name if filename != "~" else "builtin"
        rows.append({"part": f"{where}:{function} (line {line})", "kind": "own time", "seconds": own,
                     "calls": calls, "ms_per_slice": 1000.0 * own / max(1, slices)})
    return rows


def propagation_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``propagate_through_slices`` that differ from its defaults (--mode, --crop-size, --set)."""
    options: dict = {}
    if args.mode:
        options["mode"] = args.mode
    if args.crop_size or args.settings:
        from insid3_med.propagation import PropagationParams, with_overrides

        sizes = [f"image_size={args.crop_size}"] if args.crop_size else []
        options["params"] = with_overrides(PropagationParams(), sizes + list(args.settings))
    return options


def run_case(case: str, args: argparse.Namespace, slices: int) -> dict:
    """Load the model, build or read the volume, propagate, and return the figures."""
    start = time.perf_counter()
    backbone = common.load_model(args.model, args.precision, args.device)
    segmenter = OneShotSegmenter(backbone, image_size=args.size)
    load_seconds = time.perf_counter() - start
    rss_model = common.current_rss_mib()
    start = time.perf_counter()
    if case == "acdc":
        volume, labels = acdc_case(args.case)
        labels, labelled = one_labelled_slice(labels)
        description = f"ACDC {args.case} {volume.shape}, labelled slice {labelled}"
    else:
        volume, labels = synthetic_ct(slices, args.side)
        description = f"synthetic CT {volume.shape} int16, labelled slice {labelled_slices(labels, 0)}"
    prepare_seconds = time.perf_counter() - start
    rss_volume = common.current_rss_mib()
    options = propagation_options(args)
    processed: list[int] = []
    start = time.perf_counter()
    output = propagate_through_slices(segmenter, volume, labels, axis=0,
                                      progress=lambda done, total: processed.append(done), **options)
    propagate_seconds = time.perf_counter() - start
    peak = common.peak_rss_mib()
    arrays_mib = (volume.array.nbytes + labels.nbytes + output.nbytes) / 2**20
    result = {
        "case": case, "volume": description, "model": args.model, "backbone": backbone.spec.name,
        "precision": args.precision, "device": args.device, "image_size": segmenter.image_size,
        "options": {k: (repr(v) if k == "params" else v) for k, v in options.items()},
        "load_seconds": load_seconds, "prepare_seconds": prepare_seconds, "propagate_seconds": propagate_seconds,
        "end_to_end_seconds": propagate_seconds + (prepare_seconds if case == "acdc" else 0.0),
        "slices_in_volume": volume.shape[0], "slices_processed": len(processed),
        "slices_per_second": len(processed) / propagate_seconds if propagate_seconds > 0 else float("nan"),
        "labelled_voxels_out": int(np.count_nonzero(output)),
        "rss_after_model_mib": rss_model, "rss_after_volume_mib": rss_volume, "peak_rss_mib": peak,
        "volume_arrays_mib": arrays_mib, "peak_minus_arrays_mib": peak - arrays_mib,
    }
    if torch.device(args.device).type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.profile:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        propagate_through_slices(segmenter, volume, labels, axis=0, **options)
        profile.disable()
        result["profiled_seconds"] = time.perf_counter() - start
        result["parts"] = profile_parts(profile, max(1, len(processed)), result["profiled_seconds"])
    result["machine"] = common.machine(args.device)
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['volume']}; {result['model']} ({result['backbone']}), segmenter at {result['image_size']} px, "
        f"{result['precision']}, {result['device']}; propagate_through_slices options {result['options'] or 'default'}",
        f"machine: {common.describe_machine(result['machine'])}",
        f"model load {result['load_seconds']:.2f} s (not counted); volume read/built "
        f"{result['prepare_seconds']:.2f} s; "
        f"propagation {result['propagate_seconds']:.2f} s; end to end {result['end_to_end_seconds']:.2f} s",
        f"slices processed {result['slices_processed']} of {result['slices_in_volume']}: "
        f"{result['slices_per_second']:.2f} slices/s; labelled voxels out {result['labelled_voxels_out']}",
        f"memory: RSS after model {result['rss_after_model_mib']:.0f} MiB, after volume "
        f"{result['rss_after_volume_mib']:.0f} MiB, peak {result['peak_rss_mib']:.0f} MiB; volume arrays (image, "
        f"labels in and out) {result['volume_arrays_mib']:.0f} MiB; peak minus those "
        f"{result['peak_minus_arrays_mib']:.0f} MiB",
    ]
    if "parts" in result:
        lines.append(f"profiled run {result['profiled_seconds']:.2f} s; library functions (cumulative: parts nest), "
                     "then the hottest functions by their own time:")
        for row in result["parts"]:
            lines.append(f"  {row['part']:<56}{row['seconds']:>8.2f} s {row['calls']:>7} calls "
                         f"{row['ms_per_slice']:>9.1f} ms/slice  ({row['kind']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=("acdc", "ct"))
    parser.add_argument("--case", dest="acdc_case", default="patient001_frame01", help="ACDC case name")
    parser.add_argument("--slices", type=int, nargs="+", default=[300], help="CT slice counts (several: subprocesses)")
    parser.add_argument("--side", type=int, default=512, help="CT slice side in voxels")
    parser.add_argument("--model", choices=common.MODEL_CHOICES, default="standin")
    parser.add_argument("--size", type=int, default=None, help="model input side (default: acdc 448, ct 512)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", help="propagate_through_slices mode (default: its own default)")
    parser.add_argument("--crop-size", type=int, help="PropagationParams.image_size of the crops (default: its own)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a volume-mode setting, as for insid3-med propagate (repeatable)")
    parser.add_argument("--profile", action="store_true", help="add a profiled run and print the cost per part")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--json-line", action="store_true", help=argparse.SUPPRESS)  # for run_in_subprocess
    args = parser.parse_args(argv)
    args.case_name, args.case = args.case, args.acdc_case
    if args.size is None:
        args.size = 448 if args.case_name == "acdc" else 512
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case_name == "ct" and len(args.slices) > 1:
        results = [run_in_subprocess(args, count) for count in args.slices]
        for result in results:
            print(report(result), flush=True)
        base, top = results[0], results[-1]
        print(f"memory growth {base['slices_in_volume']} -> {top['slices_in_volume']} slices: peak "
              f"{top['peak_rss_mib'] - base['peak_rss_mib']:+.0f} MiB, of which volume arrays "
              f"{top['volume_arrays_mib'] - base['volume_arrays_mib']:+.0f} MiB; peak minus arrays "
              f"{top['peak_minus_arrays_mib'] - base['peak_minus_arrays_mib']:+.0f} MiB")
        if args.json:
            common.write_json(args.json, results)
        return results
    result = run_case(args.case_name, args, args.slices[0])
    print(report(result), flush=True)
    if args.json_line:
        print(JSON_MARK + json.dumps(result), flush=True)
    if args.json:
        common.write_json(args.json, result)
    return result


def run_in_subprocess(args: argparse.Namespace, slices: int) -> dict:
    """One CT run in a fresh Python process (its own peak RSS); returns its figures."""
    command = [sys.executable, str(Path(__file__).resolve()), "ct", "--slices", str(slices), "--side", str(args.side),
               "--model", args.model, "--size", str(args.size), "--precision", args.precision,
               "--device", args.device, "--json-line"]
    if args.mode:
        command += ["--mode", args.mode]
    if args.crop_size:
        command += ["--crop-size", str(args.crop_size)]
    for item in args.settings:
        command += ["--set", item]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.profile:
        command.append("--profile")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {slices}-slice run failed:\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(JSON_MARK)]
    if not lines:
        raise SystemExit(f"the {slices}-slice run printed no figures:\n{done.stdout[-2000:]}")
    return json.loads(lines[-1][len(JSON_MARK) :])


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
