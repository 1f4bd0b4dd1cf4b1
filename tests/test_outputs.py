"""Output sets: which paths count as an input of the run (RunInputs against same_file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from insid3_med.imaging.errors import OutputExistsError
from insid3_med.outputs import OutputSet, RunInputs, same_file


def test_run_inputs_answer_as_same_file_does(tmp_path: Path) -> None:
    """Existing files, a symbolic and a hard link to one, a path through '..', absent paths: one lookup gives what
    comparing with every input by same_file gives."""
    (tmp_path / "sub").mkdir()
    study, labels = tmp_path / "study.nii.gz", tmp_path / "sub" / "labels.nii.gz"
    for path in (study, labels):
        path.write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(study)
    os.link(labels, tmp_path / "hard.nii.gz")
    (tmp_path / "other.nii.gz").write_bytes(b"y")
    inputs = [study, labels, tmp_path / "absent_input.nii.gz"]
    candidates = [study, labels, tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz", tmp_path / "other.nii.gz",
                  tmp_path / "sub" / ".." / "study.nii.gz", tmp_path / "absent_input.nii.gz",
                  tmp_path / "absent_output.nii.gz"]
    known = RunInputs(inputs)
    for candidate in candidates:
        assert (candidate in known) == any(same_file(candidate, source) for source in inputs), candidate
    assert [c.name for c in candidates if c in known] == ["study.nii.gz", "labels.nii.gz", "link.nii.gz",
                                                          "hard.nii.gz", "study.nii.gz", "absent_input.nii.gz"]


def test_output_sets_of_one_run_share_its_inputs(tmp_path: Path) -> None:
    """An input added by one set (a DICOM series' files, known once read) is refused as an output of the others,
    and a set refuses to take as input a path it has already claimed."""
    study = tmp_path / "study.nii.gz"
    study.write_bytes(b"x")
    inputs = RunInputs([study])
    first, second = OutputSet(True, inputs), OutputSet(True, inputs)
    first.claim(tmp_path / "first_seg.nii.gz")
    with pytest.raises(OutputExistsError, match="input of the run"):
        second.claim(study)
    late = tmp_path / "series_file.dcm"
    late.write_bytes(b"z")
    first.protect([late])
    with pytest.raises(OutputExistsError, match="input of the run"):
        second.claim(late)
    with pytest.raises(OutputExistsError, match="first_seg.nii.gz.*input of the run"):
        first.protect([tmp_path / "first_seg.nii.gz"])
