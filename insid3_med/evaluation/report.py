"""Reports of an evaluation: ``results.json`` (every figure and the configuration), ``results.md`` (tables) and
PNG plots; :func:`compare_reports` puts several methods' results side by side for the README.

Every file is written to a temporary file in the same folder and moved into place, so no reader ever sees a
partial report.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from insid3_med.imaging.writers import atomic_output

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_FILES = ("dice_by_distance.png", "dice_per_structure.png", "dice_histogram.png", "iou_per_class.png")


class ReportExistsError(FileExistsError, ValueError):
    """The report folder holds another evaluation and ``overwrite`` was not asked for."""


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary_path)`` for a temporary file beside ``path``, then move it onto ``path`` (replacing
    it), with the permissions a plain new file gets (the umask's), as every output of the library."""
    with atomic_output(path, overwrite=True) as temporary:
        write(temporary)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def machine_description() -> dict[str, Any]:
    """Platform, CPU, Python and library versions, and the repository commit when known."""
    import monai
    import SimpleITK as sitk
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    description = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "monai": monai.__version__,
        "simpleitk": sitk.Version_VersionString(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        description["commit"] = commit or None
    except (OSError, subprocess.SubprocessError):
        description["commit"] = None
    return description


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_reports(report_dir: Path, document: dict[str, Any]) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the task's plots; returns the paths written."""
    report_dir = Path(report_dir)
    written = [report_dir / RESULTS_JSON, report_dir / RESULTS_MD]
    write_text(written[0], json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")
    write_text(written[1], markdown_report(document))
    written += write_plots(report_dir, document)
    return written


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_sd(stats: dict[str, Any], digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_report(document: dict[str, Any]) -> str:
    """The Markdown summary of one evaluation (a title, the configuration line and the task's table)."""
    task, summary = document["task"], document["summary"]
    config = document["config"]
    lines = [
        f"# {task} on {document['dataset']['name']}: {config['method']['method']}",
        "",
        f"- data: `{document['dataset']['root']}` ({document['dataset']['layout']}, "
        f"{document['dataset']['cases']} cases); seed {config['seed']}; {summary['episodes']} episodes",
        f"- method: `{json.dumps(config['method'], sort_keys=True)}`",
        f"- date: {document['date']}; machine: {document['machine']['cpu']} "
        f"({document['machine']['cpu_count']} CPUs), torch {document['machine']['torch']}",
    ]
    if document.get("command"):
        lines.append(f"- command: `{document['command']}`")
    lines.append("")
    lines += TABLES[task](summary)
    return "\n".join(lines) + "\n"


def _images_table(summary: dict[str, Any]) -> list[str]:
    lines = ["| class | episodes | IoU (pooled, %) | Dice mean ± sd | Dice median |", "|---|---|---|---|---|"]
    for name, c in summary["classes"].items():
        lines.append(f"| {name} | {c['episodes']} | {_fmt(c['iou'], 1)} | {_mean_sd(c['dice'])} | "
                     f"{_fmt(c['dice']['median'])} |")
    lines += ["", f"mIoU {_fmt(summary['miou'], 1)}, FB-IoU {_fmt(summary['fbiou'], 1)}, "
              f"Dice {_mean_sd(summary['dice'])} over {summary['episodes']} episodes."]
    return lines


def _slices_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| structure | labelled slice | episodes | 3D Dice mean ± sd | median | Dice w/o labelled slice | "
        "HD95 mm median (capped) | FP slices beyond extent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(name, kinds) for name, kinds in summary["structures"].items()] + [("all", summary["overall"])]
    for name, kinds in rows:
        for kind, g in kinds.items():
            if not g["episodes"]:
                continue
            share = "-" if g["fp_slice_share"] is None else f"{100 * g['fp_slice_share']:.0f}%"
            lines.append(
                f"| {name} | {kind} | {g['episodes']} | {_mean_sd(g['dice'])} | {_fmt(g['dice']['median'])} | "
                f"{_fmt(g['dice_unlabelled']['mean'])} | {_fmt(g['hd95_mm']['median'], 1)} ({g['hd95_capped']}) | "
                f"{share} |"
            )
    lines += ["", "HD95 of an empty prediction is capped at the volume's diagonal (count in brackets). "
              "FP slices: share of the slices beyond the structure's extent that hold predicted foreground."]
    return lines


def _transfer_table(summary: dict[str, Any]) -> list[str]:
    lines = ["| structure | pairs | 3D Dice mean ± sd | median | HD95 mm median (capped) |", "|---|---|---|---|---|"]
    rows = list(summary["structures"].items()) + [("all", summary["overall"])]
    for name, g in rows:
        lines.append(f"| {name} | {g['episodes']} | {_mean_sd(g['dice'])} | {_fmt(g['dice']['median'])} | "
                     f"{_fmt(g['hd95_mm']['median'], 1)} ({g['hd95_capped']}) |")
    return lines


TABLES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "images": _images_table, "slices": _slices_table, "transfer": _transfer_table,
}


# ------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    atomic_write(path, lambda p: figure.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    _pyplot().close(figure)
    return path


def write_plots(report_dir: Path, document: dict[str, Any]) -> list[Path]:
    """The task's PNG plots in ``report_dir``."""
    plt = _pyplot()
    task, summary = document["task"], document["summary"]
    title = f"{document['dataset']['name']} — {document['config']['method']['method']}"
    written = []
    if task == "images":
        figure, axis = plt.subplots(figsize=(5, 3.2))
        hist = summary["dice_histogram"]
        centres = (np.asarray(hist["edges"][:-1]) + np.asarray(hist["edges"][1:])) / 2
        axis.bar(centres, hist["counts"], width=0.09)
        axis.set(xlabel="Dice per episode", ylabel="episodes", title=title)
        written.append(_save(figure, report_dir / "dice_histogram.png"))
        figure, axis = plt.subplots(figsize=(5, 3.2))
        names = list(summary["classes"])
        axis.bar(names, [summary["classes"][n]["iou"] for n in names])
        axis.set(ylabel="pooled IoU (%)", ylim=(0, 100), title=title)
        written.append(_save(figure, report_dir / "iou_per_class.png"))
    if task == "slices":
        figure, axis = plt.subplots(figsize=(6, 3.8))
        for number, (name, kinds) in enumerate(summary["structures"].items()):
            for kind, group in kinds.items():
                distances, values = distance_curve(group)
                if distances:
                    axis.plot(distances, values, marker=".", color=f"C{number}",
                              linestyle="-" if kind == "largest" else "--", label=f"{name} ({kind} slice)")
        axis.set(xlabel="distance from the labelled slice (slices)", ylabel="mean 2D Dice", ylim=(0, 1),
                 title=title)
        if axis.lines:
            axis.legend(fontsize=7)
        written.append(_save(figure, report_dir / "dice_by_distance.png"))
    if task in ("slices", "transfer"):
        figure, axis = plt.subplots(figsize=(6, 3.5))
        names = list(summary["structures"])
        if task == "slices":
            kinds = sorted({k for g in summary["structures"].values() for k in g})
            width = 0.8 / max(1, len(kinds))
            for i, kind in enumerate(kinds):
                values = [_mean(summary["structures"][n].get(kind, {}).get("dice")) for n in names]
                axis.bar(np.arange(len(names)) + i * width, values, width, label=kind)
            axis.set_xticks(np.arange(len(names)) + width * (len(kinds) - 1) / 2, names, fontsize=8)
            axis.legend(fontsize=8)
        else:
            axis.bar(names, [_mean(summary["structures"][n]["dice"]) for n in names])
        axis.set(ylabel="mean 3D Dice", ylim=(0, 1), title=title)
        written.append(_save(figure, report_dir / "dice_per_structure.png"))
    return written


def distance_curve(group: dict[str, Any], min_share: float = 0.1) -> tuple[list[int], list[float]]:
    """(distances, mean 2D Dice) of a slices summary group, keeping distances reached by at least ``min_share``
    of its episodes, where the mean is not the noise of a few volumes."""
    least = max(1, int(np.ceil(min_share * group.get("episodes", 0))))
    curve = group.get("dice_by_distance", {})
    distances = sorted(int(d) for d, v in curve.items() if v["n"] >= least)
    return distances, [float(curve[str(d)]["mean"]) for d in distances]


def _mean(stats: dict[str, Any] | None) -> float:
    return float(stats["mean"]) if stats and stats.get("mean") is not None else 0.0


# ------------------------------------------------------------------------------------------------------------
# comparison of several reports
# ------------------------------------------------------------------------------------------------------------


def comparison_rows(documents: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, set, structure/class, slice kind) with each method's headline figure.

    Headline figures: mean 3D Dice (slices, transfer), pooled IoU in % (images).
    """
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for document in documents:
        task, summary = document["task"], document["summary"]
        dataset, method = document["dataset"]["name"], document["config"]["method"]["method"]

        def put(part: str, kind: str, value: Any, count: int, extra: str = "", *, _t: str = task,
                _d: str = dataset, _m: str = method) -> None:
            row = rows.setdefault((_t, _d, part, kind), {"task": _t, "set": _d, "part": part, "kind": kind,
                                                         "values": {}})
            row["values"][_m] = (value, extra, count)

        if task == "images":
            for name, c in summary["classes"].items():
                put(name, "IoU %", c["iou"], c["episodes"])
            put("mIoU", "IoU %", summary["miou"], summary["episodes"])
        elif task == "slices":
            for name, kinds in list(summary["structures"].items()) + [("all", summary["overall"])]:
                for kind, g in kinds.items():
                    if g["episodes"]:
                        put(name, f"Dice ({kind} slice)", g["dice"]["mean"], g["episodes"],
                            _fmt(g["hd95_mm"]["median"], 1))
        else:
            for name, g in list(summary["structures"].items()) + [("all", summary["overall"])]:
                put(name, f"Dice ({document['config']['task_options']['reference_mode']})", g["dice"]["mean"],
                    g["episodes"], _fmt(g["hd95_mm"]["median"], 1))
    return list(rows.values())


def compare_reports(paths: Sequence[str | Path], output_dir: str | Path | None = None,
                    methods: Sequence[str] | None = None) -> str:
    """A Markdown table of several results.json files (methods side by side); optionally also written with a
    bar chart (``comparison.md``, ``comparison.png``) to ``output_dir``.

    ``paths``: results.json files or report folders. Cells: mean 3D Dice (slices, transfer; HD95 median in mm
    in brackets) or pooled IoU in % (images); ``n=`` gives the episode count where methods differ in it.
    """
    documents = []
    for path in paths:
        path = Path(path)
        path = path / RESULTS_JSON if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results.json to compare")
        documents.append(json.loads(path.read_text()))
    rows = comparison_rows(documents)
    order = list(methods) if methods else []
    for document in documents:
        name = document["config"]["method"]["method"]
        if name not in order:
            order.append(name)
    header = "| task | set | structure | figure | " + " | ".join(order) + " |"
    lines = [header, "|" + "---|" * (4 + len(order))]
    for row in rows:
        cells = []
        counts = {v[2] for v in row["values"].values()}
        for name in order:
            value, extra, count = row["values"].get(name, (None, "", 0))
            digits = 1 if row["kind"].startswith("IoU") else 3
            cell = _fmt(value, digits) + (f" ({extra})" if extra and extra != "-" else "")
            cells.append(cell + (f" n={count}" if len(counts) > 1 and name in row["values"] else ""))
        lines.append(f"| {row['task']} | {row['set']} | {row['part']} | {row['kind']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    commands = [d["command"] for d in documents if d.get("command")]
    if commands:
        text += "\nProduced by:\n\n" + "".join(f"- `{c}`\n" for c in commands)
    if output_dir is not None:
        output_dir = Path(output_dir)
        write_text(output_dir / "comparison.md", text)
        _comparison_plot(rows, order, output_dir / "comparison.png")
        slices = [d for d in documents if d["task"] == "slices"]
        if slices:
            _distance_comparison_plot(slices, order, output_dir / "comparison_dice_by_distance.png")
    return text


def _distance_comparison_plot(documents: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """Mean 2D Dice against the distance from the labelled slice, one panel per set, one line per method."""
    plt = _pyplot()
    sets = sorted({d["dataset"]["name"] for d in documents})
    figure, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False)
    for axis, name in zip(axes[0], sets, strict=True):
        for document in (d for d in documents if d["dataset"]["name"] == name):
            method = document["config"]["method"]["method"]
            colour = f"C{methods.index(method)}" if method in methods else None
            for kind, group in document["summary"]["overall"].items():
                distances, values = distance_curve(group)
                if distances:
                    axis.plot(distances, values, marker=".", color=colour,
                              linestyle="-" if kind == "largest" else "--", label=f"{method} ({kind} slice)")
        axis.set(title=name, xlabel="distance from the labelled slice (slices)", ylabel="mean 2D Dice", ylim=(0, 1))
        if axis.lines:
            axis.legend(fontsize=6)
    return _save(figure, path)


def _comparison_plot(rows: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """Grouped bars, one group per row of the comparison (per-structure Dice; per-class IoU), one bar per method."""
    plt = _pyplot()
    dice_rows = [r for r in rows if r["kind"].startswith("Dice") and r["part"] != "all"]
    iou_rows = [r for r in rows if r["kind"].startswith("IoU") and r["part"] != "mIoU"]
    panels = [(p, t) for p, t in ((dice_rows, "mean 3D Dice"), (iou_rows, "pooled IoU (%)")) if p]
    widest = max((len(p) for p, _ in panels), default=4)
    figure, axes = plt.subplots(max(1, len(panels)), 1, figsize=(max(6.0, 0.45 * widest), 4.2 * max(1, len(panels))),
                                squeeze=False)
    for axis, (panel, label) in zip(axes[:, 0], panels, strict=False):
        width = 0.8 / max(1, len(methods))
        positions = np.arange(len(panel))
        for i, method in enumerate(methods):
            values = [r["values"].get(method, (None, "", 0))[0] for r in panel]
            axis.bar(positions + i * width, [v if v is not None else 0.0 for v in values], width, label=method,
                     color=f"C{i}")
        names = [f"{r['task']} {r['set']}: {r['part']}" + (f" [{r['kind'].split('(')[-1].rstrip(')')}]"
                                                           if "(" in r["kind"] else "") for r in panel]
        axis.set_xticks(positions + width * (len(methods) - 1) / 2, names, fontsize=6, rotation=60, ha="right")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
