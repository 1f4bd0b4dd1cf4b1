"""All-or-nothing output sets and run summaries, shared by the CLI, the bundle and the Slicer job runner.

An :class:`OutputSet` hands every writer a temporary path beside its final one; only when every file of a run has
been written are they renamed into place, so a failure leaves no partial output and never replaces an existing file
unless overwriting was asked for; an input of the run is never an output, even when overwriting.
"""

from __future__ import annotations

import json
import os
import platform
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from insid3_med.imaging.errors import OutputExistsError
from insid3_med.imaging.geometry import Volume


class RunInputs:
    """The files of a run that no output may replace, identified once (by device and inode where they exist, by
    resolved path always), so that testing a path is one lookup whatever their number; the same answers as
    :func:`same_file` against each of them."""

    def __init__(self, paths: Iterable[str | Path] = ()) -> None:
        self._resolved: set[Path] = set()
        self._file_ids: set[tuple[int, int]] = set()
        self.add(paths)

    def add(self, paths: Iterable[str | Path]) -> None:
        for path in paths:
            self._resolved.add(Path(path).expanduser().resolve())
            identity = _file_id(Path(path).expanduser())
            if identity is not None:
                self._file_ids.add(identity)

    def __contains__(self, path: str | Path) -> bool:
        path = Path(path).expanduser()
        return _file_id(path) in self._file_ids or path.resolve() in self._resolved


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


class OutputSet:
    """Final paths -> temporary paths; :meth:`commit` renames them all, :meth:`abort` deletes them.

    ``inputs``: the run's input files, which no output may replace (a :class:`RunInputs` may be shared by the
    output sets of one run, so that they are identified once).
    """

    def __init__(self, overwrite: bool = False, inputs: RunInputs | Iterable[str | Path] = ()) -> None:
        self.overwrite = overwrite
        self._pending: dict[Path, Path] = {}
        self._inputs = inputs if isinstance(inputs, RunInputs) else RunInputs(inputs)

    def claim(self, path: str | Path) -> Path:
        """Reserve ``path``; returns the temporary path to write instead (same folder, same suffixes)."""
        final = Path(path).expanduser().absolute()
        if final in self._inputs:
            raise OutputExistsError(final, "this output path is an input of the run; write the result elsewhere")
        if final.is_dir():
            raise OutputExistsError(final, "is a folder; give the output's file name (a file inside it)")
        if final.exists() and not self.overwrite:
            raise OutputExistsError(final, "output exists; use --force to overwrite it")
        if final in self._pending:
            raise OutputExistsError(final, "the same output path is used twice")
        if not final.parent.is_dir():
            raise OutputExistsError(final.parent, "output folder does not exist")
        temporary = partial_path(final)
        self._pending[final] = temporary
        return temporary

    def protect(self, inputs: Iterable[str | Path]) -> None:
        """Add inputs known only once read (a DICOM series' files); refuses a path already claimed among them."""
        inputs = list(inputs)
        added = RunInputs(inputs)
        for final in self._pending:
            if final in added:
                raise OutputExistsError(final, "this output path is an input of the run; write the result elsewhere")
        self._inputs.add(inputs)

    def commit(self) -> list[Path]:
        """Rename every written temporary file into place; returns the final paths."""
        for final, temporary in self._pending.items():
            if not temporary.exists():
                raise RuntimeError(f"{final}: was claimed but never written")
        for final, temporary in self._pending.items():
            os.replace(temporary, final)
        done = list(self._pending)
        self._pending.clear()
        return done

    def abort(self) -> None:
        """Delete every temporary file written so far."""
        for temporary in self._pending.values():
            temporary.unlink(missing_ok=True)
        self._pending.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        """Commit when the block succeeded; abort (delete the temporaries) when it raised."""
        if error_type is None:
            self.commit()
        else:
            self.abort()


def partial_path(final: Path) -> Path:
    """A fresh temporary name beside ``final`` that keeps its suffixes (writers pick the format from them)."""
    return final.with_name(f".insid3-partial-{uuid.uuid4().hex[:8]}-{final.name}")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (links and ``..`` resolved; an absent path is the same only by name)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


@contextmanager
def output_set(overwrite: bool = False, inputs: RunInputs | Iterable[str | Path] = ()) -> Iterator[OutputSet]:
    """``with output_set(force, inputs) as outputs:`` claim paths, write to the returned temporaries; commit on
    success. ``inputs``: the run's input files, which no output may replace."""
    with OutputSet(overwrite, inputs) as outputs:
        yield outputs


def label_statistics(labels: np.ndarray, volume: Volume, axis: int,
                     names: dict[int, str] | None = None) -> dict[str, Any]:
    """Per label value: voxels, volume in mL and the slices (along array ``axis``) it covers."""
    voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
    other = tuple(a for a in range(3) if a != axis)
    stats: dict[str, Any] = {}
    for value in (int(v) for v in np.unique(labels) if v > 0):
        present = labels == value
        covered = np.flatnonzero(np.any(present, axis=other))
        voxels = int(present.sum())
        stats[str(value)] = {
            "name": (names or {}).get(value, f"Segment_{value}"),
            "voxels": voxels,
            "volume_ml": round(voxels * voxel_ml, 4),
            "slices": [int(covered.min()), int(covered.max())],
            "slice_count": int(covered.size),
        }
    return stats


def software_versions() -> dict[str, str]:
    """The versions that made an output: insid3-med, torch, MONAI (for a run's summary)."""
    import monai
    import torch

    from insid3_med import __version__

    return {"insid3_med": __version__, "torch": torch.__version__, "monai": monai.__version__}


def machine_description() -> dict[str, str]:
    """Platform, processor, Python and torch versions, for reports."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON to ``path`` (a temporary path from an OutputSet)."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
