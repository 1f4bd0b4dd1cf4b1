"""Errors raised by the image readers and writers; each names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class ImageReadError(ValueError):
    """An input image, volume or label map that cannot be read as asked (missing, corrupt, 4D, wrong
    grid...)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SeveralSeriesError(ImageReadError):
    """A DICOM folder holding several image series where none was chosen (the message lists them)."""


class SeveralFramesError(ImageReadError):
    """A 4D image (frames of a cine, contrasts of a multi-modal study) where no frame was chosen."""

    def __init__(self, path: str | Path, problem: str, frames: int) -> None:
        super().__init__(path, problem)
        self.frames = frames


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """The input path does not exist (both a ``ValueError`` and a ``FileNotFoundError``)."""


class ImageWriteError(ValueError):
    """An output that cannot be written from the given labels and reference volume."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputExistsError(ImageWriteError, FileExistsError):
    """The output file exists and ``overwrite=True`` was not given."""
