"""One propagation or transfer, from arrays to arrays: export inputs, build the command, read the results.

A run owns a private :class:`~.exchange.ExchangeFolder`; :meth:`start` returns a started
:class:`~.jobs.CommandJob` that the caller polls; once it has succeeded, ``read_result(s)`` gives label maps on
the input grids. ``cleanup`` removes the folder (call it whatever the outcome).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from insid3_med.imaging.geometry import Volume

from .commands import propagate_command, transfer_command, transfer_output_path
from .exchange import ExchangeFolder, read_label_map, write_label_map, write_volume
from .jobs import CommandJob, JobState
from .validation import PropagationPlan


def _check_labels(volume: Volume, label_map: np.ndarray, what: str) -> None:
    if tuple(np.asarray(label_map).shape) != volume.shape:
        raise ValueError(f"{what}: label map shape {np.shape(label_map)} differs from the volume's {volume.shape}")


@dataclass
class PropagationRun:
    """Propagation through one volume: ``volume.nii.gz`` + ``labels.nii.gz`` in, ``propagated.nii.gz`` out."""

    folder: ExchangeFolder
    volume: Volume
    plan: PropagationPlan
    command: list[str]
    output_path: Path
    job: CommandJob | None = field(default=None, init=False)

    @classmethod
    def prepare(
        cls,
        volume: Volume,
        label_map: np.ndarray,
        plan: PropagationPlan,
        tool: Sequence[str | Path],
        *,
        parent_folder: str | Path | None = None,
    ) -> PropagationRun:
        """Export the volume and its (K, J, I) label map (segment n = label n + 1) and build the command."""
        _check_labels(volume, label_map, "propagation")
        folder = ExchangeFolder(parent_folder)
        try:
            volume_path = write_volume(volume, folder.file("volume.nii.gz"))
            labels_path = write_label_map(label_map, volume.geometry, folder.file("labels.nii.gz"))
            output_path = folder.file("propagated.nii.gz")
            command = propagate_command(tool, volume_path, labels_path, output_path, plan)
        except BaseException:
            folder.cleanup()
            raise
        return cls(folder=folder, volume=volume, plan=plan, command=command, output_path=output_path)

    def start(self, env: Mapping[str, str] | None = None) -> CommandJob:
        """Start the tool in a child process (once)."""
        if self.job is not None:
            raise RuntimeError("this run was already started")
        self.job = CommandJob(self.command, env=env, cwd=self.folder.path)
        return self.job.start()

    def read_result(self) -> np.ndarray:
        """The propagated (K, J, I) label map on the volume's grid (after the job succeeded)."""
        if self.job is None or self.job.state is not JobState.SUCCEEDED:
            raise RuntimeError("the propagation has not succeeded; nothing to read")
        return read_label_map(self.output_path, self.volume.geometry, self.volume.shape)

    def cleanup(self) -> None:
        self.folder.cleanup()


@dataclass
class TransferRun:
    """Transfer of a reference's labels to other studies: one ``target_NN.nii.gz`` in, one label map out each."""

    folder: ExchangeFolder
    reference: Volume
    targets: list[Volume]
    plan: PropagationPlan
    command: list[str]
    output_paths: list[Path]
    job: CommandJob | None = field(default=None, init=False)

    @classmethod
    def prepare(
        cls,
        reference: Volume,
        label_map: np.ndarray,
        targets: Sequence[Volume],
        plan: PropagationPlan,
        tool: Sequence[str | Path],
        *,
        parent_folder: str | Path | None = None,
    ) -> TransferRun:
        """Export the reference, its label map and every target; build the command."""
        _check_labels(reference, label_map, "transfer")
        if not targets:
            raise ValueError("transfer needs at least one target volume")
        folder = ExchangeFolder(parent_folder)
        try:
            reference_path = write_volume(reference, folder.file("reference.nii.gz"))
            labels_path = write_label_map(label_map, reference.geometry, folder.file("reference_labels.nii.gz"))
            target_paths = [
                write_volume(target, folder.file(f"target_{index:02d}.nii.gz")) for index, target in enumerate(targets)
            ]
            output_dir = folder.path / "results"
            output_dir.mkdir()
            output_paths = [transfer_output_path(output_dir, path) for path in target_paths]
            command = transfer_command(tool, reference_path, labels_path, target_paths, output_dir, plan)
        except BaseException:
            folder.cleanup()
            raise
        return cls(
            folder=folder,
            reference=reference,
            targets=list(targets),
            plan=plan,
            command=command,
            output_paths=output_paths,
        )

    def start(self, env: Mapping[str, str] | None = None) -> CommandJob:
        if self.job is not None:
            raise RuntimeError("this run was already started")
        self.job = CommandJob(self.command, env=env, cwd=self.folder.path)
        return self.job.start()

    def read_results(self) -> list[np.ndarray]:
        """One (K, J, I) label map per target, on that target's grid, in the order of ``targets``."""
        if self.job is None or self.job.state is not JobState.SUCCEEDED:
            raise RuntimeError("the transfer has not succeeded; nothing to read")
        return [
            read_label_map(path, target.geometry, target.shape)
            for path, target in zip(self.output_paths, self.targets, strict=True)
        ]

    def cleanup(self) -> None:
        self.folder.cleanup()
