"""Finished episodes on disk, so that an interrupted evaluation resumes where it stopped.

One JSON object per line in ``REPORT_DIR/episodes.jsonl``: ``{"config": HASH, "id": EPISODE_ID, "result": {...}}``.
The configuration hashed includes :func:`code_fingerprint`: after a change of the package's code, every episode runs
again.
A line is appended (and flushed to disk) as soon as an episode is scored. A line cut short by an interruption is
ignored when the file is read back, and the episode is run again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from insid3_med.evaluation.report import write_text

EPISODES_FILE = "episodes.jsonl"


@functools.cache
def code_fingerprint() -> str:
    """Short sha256 of this package's Python sources (paths and contents): part of an evaluation's configuration,
    so that finished episodes are reused only by the code that produced them."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def config_hash(config: dict[str, Any]) -> str:
    """Short sha256 of a configuration (keys sorted), naming the episodes it produced."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EpisodeStore:
    """Append-only record of finished episodes of one configuration in a report folder."""

    def __init__(self, report_dir: Path, config_key: str) -> None:
        self.path = Path(report_dir) / EPISODES_FILE
        self.config_key = config_key
        self._done: dict[str, dict[str, Any]] = {}
        self.other_configs: set[str] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open() as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
                if not isinstance(record, dict) or "id" not in record or "result" not in record:
                    continue
                if record.get("config") == self.config_key:
                    self._done[str(record["id"])] = record["result"]
                else:
                    self.other_configs.add(str(record.get("config")))

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, episode_id: str) -> dict[str, Any] | None:
        return self._done.get(episode_id)

    def add(self, episode_id: str, result: dict[str, Any]) -> None:
        """Record a finished episode (appended and synced to disk at once)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"config": self.config_key, "id": episode_id, "result": result}, default=_json_default)
        with self.path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._done[episode_id] = json.loads(line)["result"]

    def forget(self) -> None:
        """Start afresh in memory: this configuration's records are run again. The file is left as it is until
        :meth:`compact` rewrites it, so an interrupted rerun loses nothing of the earlier evaluation."""
        self._done.clear()

    def compact(self) -> None:
        """Rewrite the file (atomically) with this configuration's records only: other configurations' go."""
        lines = [json.dumps({"config": self.config_key, "id": i, "result": result}, default=_json_default)
                 for i, result in self._done.items()]
        write_text(self.path, "".join(line + "\n" for line in lines))
        self.other_configs.clear()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
