"""Command lines of the ``insid3-med`` tool, run as ``PythonSlicer -m insid3_med ...`` from Slicer.

The tool prints one ``PROGRESS <done> <total>`` line per slice with ``--progress lines`` (parsed by
:mod:`.jobs`), exits 0 on success, 2 on bad input and 3 when the backbone weights are missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .slices import AXIS_LETTERS
from .validation import PropagationPlan

CLI_MODULE = "insid3_med"
EXIT_BAD_INPUT = 2
EXIT_WEIGHTS_MISSING = 3
EXIT_TERMINATED = 143  # insid3-med sent SIGTERM by another program (a shutdown, a job scheduler)

CROP_ENSEMBLE = "crop_ensemble=1.25,1.5,1.75"  # the "three crop sizes" option: ``--set`` of insid3-med
NO_RANDOM_WALK = "random_walk_beta=none"  # the "boundaries on image edges in 3D" option unticked (on by default)

_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")


def format_slice_range(first: int, last: int) -> str:
    """``--slices`` value for the inclusive 0-based range first..last: ``"first:last+1"`` (end excluded, as in
    Python slicing)."""
    if first < 0 or last < first:
        raise ValueError(f"invalid slice range {first}-{last}")
    return f"{first}:{last + 1}"


def _common_options(plan: PropagationPlan, axis: str | None = None) -> list[str]:
    settings = plan.settings
    options = ["--axis", axis or AXIS_LETTERS[plan.axis], "--precision", settings.precision]
    options += ["--image-size", str(settings.image_size), "--progress", "lines"]
    if settings.device != "auto":
        options += ["--device", settings.device]
    if settings.weights:
        options += ["--weights", str(settings.weights)]
    if settings.crop_ensemble:
        options += ["--set", CROP_ENSEMBLE]
    if not settings.random_walk:
        options += ["--set", NO_RANDOM_WALK]
    return options


def module_command(python: str | Path) -> list[str]:
    """``[python, "-m", "insid3_med"]``: the tool run by a given interpreter (PythonSlicer inside Slicer)."""
    return [str(python), "-m", CLI_MODULE]


def propagate_command(
    tool: Sequence[str | Path],
    volume_path: str | Path,
    labels_path: str | Path,
    output_path: str | Path,
    plan: PropagationPlan,
    *,
    summary_path: str | Path | None = None,
) -> list[str]:
    """``insid3-med propagate VOLUME LABELS -o OUT`` with the plan's axis, slice range and settings.

    ``tool``: the command that runs insid3-med, normally ``module_command(PythonSlicer)``.
    """
    command = [str(part) for part in tool] + ["propagate", str(volume_path), str(labels_path), "-o", str(output_path)]
    command += _common_options(plan)
    first, last = plan.slice_range
    command += ["--slices", format_slice_range(first, last)]
    if summary_path is not None:
        command += ["--summary", str(summary_path)]
    return command


def transfer_command(
    tool: Sequence[str | Path],
    reference_volume: str | Path,
    reference_labels: str | Path,
    targets: Sequence[str | Path],
    output_dir: str | Path,
    plan: PropagationPlan,
) -> list[str]:
    """``insid3-med transfer REF_VOLUME REF_LABELS TARGET... -o OUT_DIR`` with the plan's settings.

    The axis chosen by the user is passed as its array letter; the automatic one as ``auto``, so that the tool
    slices each target in the anatomical plane the reference was labelled in, whatever the target's array order.
    """
    if not targets:
        raise ValueError("transfer needs at least one target volume")
    command = [str(part) for part in tool] + ["transfer", str(reference_volume), str(reference_labels)]
    command += [str(t) for t in targets] + ["-o", str(output_dir)]
    return command + _common_options(plan, "auto" if plan.settings.axis is None else None)


def volume_stem(path: str | Path) -> str:
    """File name without .nii/.nii.gz/.nrrd/.mha (the folder name for a DICOM folder), as the tool names outputs."""
    path = Path(path)
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def transfer_output_path(output_dir: str | Path, target: str | Path) -> Path:
    """Where ``insid3-med transfer`` writes the labels of ``target``: ``OUT_DIR/<stem>_seg.nii.gz``."""
    return Path(output_dir) / f"{volume_stem(target)}_seg.nii.gz"


def find_python_slicer(search_dirs: Sequence[str | Path] = (), fallback: str | None = sys.executable) -> str | None:
    """Path of Slicer's ``PythonSlicer`` launcher: first in ``search_dirs`` (e.g. Slicer's bin folder), then PATH.

    Returns ``fallback`` when no launcher is found: by default the running interpreter, which is right outside
    Slicer (tests, scripts); inside Slicer pass ``fallback=None`` and treat ``None`` as an error. The launcher sets
    Slicer's library paths, so a child started through it imports what Slicer's Python has.
    """
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    for folder in search_dirs:
        for name in names:
            candidate = Path(folder) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("PythonSlicer")
    return found if found else fallback
