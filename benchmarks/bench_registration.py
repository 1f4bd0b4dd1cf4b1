"""Registering two frames of one subject (``transfer``'s first step) on grids of several sizes, in one run.

    python benchmarks/bench_registration.py [--patients 5] [--voxels full 262144 131072] [--threads 1] [--json PATH]

Each of the first ``--patients`` ACDC patients' end-systole (frame02) is registered onto its end-diastole (frame01)
as a transfer between frames registers them (``insid3_med.registration.deformable_study_transform``: affine Mattes
MI, then 3D demons), once per grid limit of ``--voxels`` (``full``: no binning), the limits taken in turn for each
patient so that all see the same machine load. The script prints each registration's seconds, each limit's total
and its speed-up over the first limit, and, as a check that the coarser grids still register, how much of the
end-systolic left ventricle the end-diastolic one covers once carried (Dice before and after registration).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
import SimpleITK as sitk
import torch


def limit(text: str) -> int | None:
    return None if text == "full" else int(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument("--voxels", type=limit, nargs="+", default=[None, 2**18, 2**17],
                        help="grid limits in voxels, 'full' for none (default: full 262144 131072)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    from insid3_med.evaluation.metrics import dice
    from insid3_med.imaging.readers import read_label_volume, read_volume
    from insid3_med.registration import carry_labels_to_study, deformable_study_transform

    data = common.SHARED / "data" / "acdc"
    if not (data / "images").is_dir():
        raise SystemExit(f"the ACDC set is not at {data}")
    patients = sorted({p.name.split("_")[0] for p in (data / "images").glob("*_frame01.nii.gz")})[: args.patients]
    names = ["full" if v is None else str(v) for v in args.voxels]
    rows = []
    for patient in patients:
        (ed, ed_labels), (es, es_labels) = (
            (volume := read_volume(data / "images" / f"{patient}_{frame}.nii.gz"),
             read_label_volume(data / "labels" / f"{patient}_{frame}.nii.gz", like=volume))
            for frame in ("frame01", "frame02"))
        row: dict[str, object] = {"patient": patient, "shape": list(es.shape),
                                  "dice_unregistered": round(dice(ed_labels == 3, es_labels == 3), 4)}
        for name, voxels in zip(names, args.voxels, strict=True):
            start = time.perf_counter()
            transform = deformable_study_transform(es, ed, max_voxels=voxels)
            seconds = time.perf_counter() - start
            carried = carry_labels_to_study(ed, ed_labels, es, transform)
            row[f"{name}_s"] = round(seconds, 3)
            row[f"{name}_dice"] = round(dice(carried == 3, es_labels == 3), 4)
        rows.append(row)
        print(f"{patient} {tuple(es.shape)}: " + ", ".join(f"{n} {row[f'{n}_s']:.1f} s (LV Dice {row[f'{n}_dice']})"
                                                           for n in names)
              + f"; unregistered LV Dice {row['dice_unregistered']}", flush=True)
    totals = {name: round(sum(float(r[f"{name}_s"]) for r in rows), 3) for name in names}  # type: ignore[arg-type]
    result = {"patients": len(rows), "rows": rows, "total_s": totals,
              "speedup": {name: round(totals[names[0]] / totals[name], 3) if totals[name] else None for name in names},
              "mean_lv_dice": {name: round(float(np.mean([r[f"{name}_dice"] for r in rows])), 4) for name in names},
              "machine": common.machine("cpu"), "threads": args.threads}
    print(f"{len(rows)} pairs: " + ", ".join(f"{n} {totals[n]:.1f} s ({result['speedup'][n]}x, LV Dice "
                                             f"{result['mean_lv_dice'][n]})" for n in names)
          + f"; {common.describe_machine(result['machine'])}, {args.threads} thread(s)")
    if args.json:
        common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
