"""Transfer to several studies from one reference: the reference's own chain run once, against once per target.

    python benchmarks/bench_transfer.py [--reference hippocampus_007] [--targets 4] [--set hippocampus]
    python benchmarks/bench_transfer.py --set acdc --reference patient001_frame01 --targets 4
    common options: [--model standin] [--precision fp32|bf16] [--threads N] [--json PATH]

The reference keeps only its slice of largest labelled area (array axis 0). Each target (the next ``--targets``
volumes of the set, sorted by name, the reference left out) is segmented twice in one run, alternately, so that
both ways see the same machine load: with ``transfer_to_study`` (the reference chained through itself for every
target, as before ``StudyTransfer``) and with one ``StudyTransfer`` (chained once, on the first target). The script
prints each target's seconds both ways, the totals and their ratio, and checks that both give the same label maps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
import torch

from insid3_med.predictor import OneShotSegmenter

SETS = ("hippocampus", "acdc")


def read_case(data: Path, name: str) -> tuple[object, np.ndarray]:
    from insid3_med.imaging.readers import read_label_volume, read_volume

    volume = read_volume(data / "images" / f"{name}.nii.gz")
    return volume, read_label_volume(data / "labels" / f"{name}.nii.gz", like=volume)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="dataset", choices=SETS, default="hippocampus")
    parser.add_argument("--reference", help="reference case (default: the set's first)")
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--model", choices=common.MODEL_CHOICES, default="standin")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from insid3_med.volume import StudyTransfer, transfer_to_study

    data = common.SHARED / "data" / args.dataset
    if not (data / "images").is_dir():
        raise SystemExit(f"the {args.dataset} set is not at {data}")
    names = sorted(p.name.removesuffix(".nii.gz") for p in (data / "images").glob("*.nii.gz"))
    reference_name = args.reference or names[0]
    targets = [n for n in names if n != reference_name][: args.targets]
    reference, labels = read_case(data, reference_name)
    counts = np.count_nonzero(labels, axis=(1, 2))
    given = np.zeros_like(labels)
    given[int(np.argmax(counts))] = labels[int(np.argmax(counts))]
    segmenter = OneShotSegmenter(common.load_model(args.model, args.precision))
    transfer = StudyTransfer(segmenter, reference, given, axis=0)
    rows = []
    for name in targets:
        target, _ = read_case(data, name)
        start = time.perf_counter()
        each = transfer_to_study(segmenter, reference, given, target, axis=0)
        middle = time.perf_counter()
        once = transfer.segment(target)
        end = time.perf_counter()
        rows.append({"target": name, "per_target_chain_s": round(middle - start, 3),
                     "one_chain_s": round(end - middle, 3), "same_labels": bool(np.array_equal(each, once))})
        print(f"{name}: reference chained for this target {middle - start:.2f} s, chained once "
              f"{end - middle:.2f} s, same labels: {rows[-1]['same_labels']}", flush=True)
    each_total = sum(r["per_target_chain_s"] for r in rows)
    once_total = sum(r["one_chain_s"] for r in rows)
    result = {"set": args.dataset, "reference": reference_name, "targets": len(rows), "rows": rows,
              "per_target_chain_total_s": round(each_total, 3), "one_chain_total_s": round(once_total, 3),
              "ratio": round(each_total / once_total, 3) if once_total else None,
              "machine": common.machine("cpu"), "threads": torch.get_num_threads(), "model": args.model,
              "precision": args.precision}
    print(f"{len(rows)} targets: {each_total:.1f} s chaining the reference for each, {once_total:.1f} s chaining it "
          f"once ({result['ratio']}x); {common.describe_machine(result['machine'])}, {result['threads']} thread(s)")
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
