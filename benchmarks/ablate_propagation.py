"""The volume mode's ablation table, through the evaluation harness: what each setting adds, set by set.

    python benchmarks/ablate_propagation.py [--sets acdc hippocampus brats] [--volumes N]
                                            [--variants default no_gate ...] [--output reports/ablation]
                                            [--threads N] [--json PATH] [--markdown PATH]
    python benchmarks/ablate_propagation.py --from-json rows.json [more.json ...] --markdown PATH

A variant is a list of :class:`insid3_med.propagation.PropagationParams` overrides (``KEY=VALUE``, as after
``insid3-med evaluate --set``); ``default`` has none. Each (variant, set) is one harness run of the ``slices`` task
(the slice of largest area labelled, one structure per episode; stand-in backbone, fp32, seed 0) on the first
``--volumes`` volumes of the set by the harness's seeded order (all when omitted), written to
``<output>/<set>_<variant>/`` like any report, so an interrupted ablation resumes where it stopped. Printed per
variant and set: mean 3D Dice, the share of false-positive slices beyond the structure's extent, the Dice of each
structure, and the difference in mean Dice to ``default``. ``--markdown`` writes them as one table (a column
per set); ``--from-json`` makes that table from the ``--json`` rows of earlier runs (for example one per set, run
side by side) without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import common
import torch

from insid3_med.evaluation.run import run_evaluation
from insid3_med.propagation import PropagationParams, with_overrides

SETS = ("acdc", "hippocampus", "brats")

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "former_defaults": ["gate_tracking=false", "gate_sigma=0.03", "stop_confidence=0.85"],
    "no_gate_tracking": ["gate_tracking=false"],
    "no_confidence_stop": ["stop_confidence=none"],
    "no_area_stop": ["stop_ratio=0"],
    "no_gate": ["gate_sigma=none"],
    "no_refinement": ["refine_band=none"],
    "labelled_slice_only": ["recent_slices=0"],
    "registration_blend_0.3": ["registration_weight=0.3"],
    "flip": ["flip=true"],
    "crop_1.25x": ["crop_scale=1.25"],
    "crop_1.5x": ["crop_scale=1.5"],
    "crop_1.75x": ["crop_scale=1.75"],
    "crop_2x": ["crop_scale=2"],
    "crop_3x": ["crop_scale=3"],
    "crop_ensemble_3": ["crop_ensemble=1.25,1.5,1.75"],
    "crop_ensemble_5": ["crop_ensemble=1.2,1.35,1.5,1.65,1.8"],
    "temperature_0.03": ["temperature=0.03"],
    "temperature_0.1": ["temperature=0.1"],
    "top_k_5": ["top_k=5"],
    "top_k_20": ["top_k=20"],
    "neighbourhood_2": ["neighbourhood=2"],
    "neighbourhood_4": ["neighbourhood=4"],
    "recent_slices_3": ["recent_slices=3"],
    "gate_sigma_0.03": ["gate_sigma=0.03"],
    "gate_sigma_0.05": ["gate_sigma=0.05"],
    "stop_confidence_0.85": ["stop_confidence=0.85"],
    "stop_confidence_0.9": ["stop_confidence=0.9"],
    "registration_full_size": ["registration_size=none"],
    "registration_size_64": ["registration_size=64"],
    "refine_band_0.05": ["refine_band=0.05"],
    "refine_strength_2": ["refine_strength=2"],
    "no_random_walk": ["random_walk_beta=none"],
    "no_intensity_likelihood": ["intensity_likelihood=none"],
    "intensity_likelihood_0.5": ["intensity_likelihood=0.5"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--volumes", type=int, help="volumes per set, a seeded subset (default: all)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="default: every variant; 'default' is always run for the differences")
    parser.add_argument("--output", type=Path, default=common.ROOT / "reports" / "ablation",
                        help="report folders go here (default reports/ablation)")
    parser.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--markdown", type=Path, help="also write the rows as a Markdown table")
    parser.add_argument("--from-json", type=Path, nargs="+", help="only tabulate the rows of these --json files")
    return parser.parse_args(argv)


def run_variant(name: str, dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """One harness run; returns its row: variant, set, dice, fp_slice_share, per-structure Dice, settings."""
    data = common.SHARED / "data" / dataset
    params = with_overrides(PropagationParams(), VARIANTS[name])
    document = run_evaluation("slices", data, args.output / f"{dataset}_{name}", method="ours",
                              backbone_options={"weights": str(common.STANDIN), "device": "cpu"},
                              episodes=args.volumes, kinds=("largest",), threads=args.threads, progress=False,
                              propagation=params, command=f"benchmarks/ablate_propagation.py variant {name}: "
                              + (" ".join(f"--set {item}" for item in VARIANTS[name]) or "defaults"))
    summary = document["summary"]
    overall = summary["overall"]["largest"]
    return {
        "variant": name, "set": dataset, "settings": VARIANTS[name],
        "dice": overall["dice"]["mean"], "fp_slice_share": overall["fp_slice_share"],
        "structures": {structure: rows["largest"]["dice"]["mean"]
                       for structure, rows in summary["structures"].items() if "largest" in rows},
        "episodes": overall["dice"]["n"],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per variant, one column per set: mean 3D Dice (difference to the defaults) / FP-slice share."""
    sets = list(dict.fromkeys(row["set"] for row in rows))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    cells = {(row["variant"], row["set"]): row for row in rows}
    episodes = {name: max(row["episodes"] for row in rows if row["set"] == name) for name in sets}
    lines = ["| variant | settings | " + " | ".join(f"{name} ({episodes[name]} episodes): Dice (vs default) / FP slices"
                                                   for name in sets) + " |",
             "|---|---|" + "---|" * len(sets)]
    for variant in variants:
        settings = next(row["settings"] for row in rows if row["variant"] == variant)
        values = []
        for name in sets:
            row = cells.get((variant, name))
            if row is None:
                values.append("")
                continue
            share = "-" if row["fp_slice_share"] is None else f"{row['fp_slice_share']:.1%}"
            delta = "" if variant == "default" else f" ({round(row['dice_vs_default'], 3) + 0.0:+.3f})"
            values.append(f"{row['dice']:.3f}{delta} / {share}")
        lines.append(f"| {variant} | {' '.join(f'`{item}`' for item in settings) or 'defaults'} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
        table = markdown_table(rows)
        print(table, end="")
        if args.markdown is not None:
            args.markdown.write_text(table)
        return rows
    missing = [name for name in args.sets if not (common.SHARED / "data" / name).is_dir()]
    if missing or not common.STANDIN.is_dir():
        raise SystemExit(f"needs ../shared/data/{{{','.join(args.sets)}}} and the stand-in weights "
                         f"({common.STANDIN}); missing: {missing or [str(common.STANDIN)]}")
    variants = ["default"] + [name for name in args.variants if name != "default"]
    torch.set_num_threads(max(1, args.threads))
    machine = common.describe_machine(common.machine("cpu"))
    print(f"# volume-mode ablation, stand-in backbone, slices task (largest slice); {machine}")
    print(f"{'variant':<24} {'set':<12} {'Dice':>6} {'vs default':>10} {'FP slices':>9}  structures")
    rows, baseline = [], {}
    for dataset in args.sets:
        for name in variants:
            row = run_variant(name, dataset, args)
            if name == "default":
                baseline[dataset] = row["dice"]
            row["dice_vs_default"] = row["dice"] - baseline[dataset]
            rows.append(row)
            structures = ", ".join(f"{s} {d:.3f}" for s, d in row["structures"].items())
            share = row["fp_slice_share"]
            fp = f"{share:8.1%}" if share is not None else f"{'-':>8}"
            print(f"{name:<24} {dataset:<12} {row['dice']:6.3f} {row['dice_vs_default']:+10.3f} {fp}  {structures}",
                  flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
