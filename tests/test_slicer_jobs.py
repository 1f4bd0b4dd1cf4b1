"""The Slicer extension's job runner and runs (OneShotPropagateLib.jobs / .runs), outside Slicer.

Most tests start a STAND-IN for the insid3-med command line (slicer_extension/OneShotPropagate/Testing/Python/
stand_in_insid3_med.py: same options, PROGRESS lines, copies the nearest labelled slice instead of running a model,
and can fail, hang or ignore SIGTERM on request) so that the subprocess handling is tested without the model. One
slow test runs the real ``python -m insid3_med`` with the small DINOv2 stand-in weights.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from insid3_med.imaging.geometry import Geometry, Volume

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "slicer_extension" / "OneShotPropagate"
STAND_IN = MODULE_DIR / "Testing" / "Python" / "stand_in_insid3_med.py"
DATA = ROOT / ".." / "shared" / "data"
STANDIN_WEIGHTS = ROOT / ".." / "shared" / "weights" / "dinov2-small-standin"
sys.path.insert(0, str(MODULE_DIR))

from OneShotPropagateLib import commands, conversion, jobs, runs, validation  # noqa: E402

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="checks POSIX process groups and signals")


def stand_in_tool() -> list[str]:
    return [sys.executable, str(STAND_IN)]


def environment(**knobs: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(knobs)
    return env


def study(shape=(10, 12, 14), origin=(5.0, -3.0, 20.0)) -> Volume:
    rng = np.random.default_rng(1)
    geometry = Geometry(spacing=(0.8, 0.9, 2.5), origin=origin,
                        direction=((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0)))
    return Volume(rng.normal(size=shape).astype(np.float32), geometry)


def one_slice(shape=(10, 12, 14), k=4) -> np.ndarray:
    label_map = np.zeros(shape, np.uint8)
    label_map[k, 2:7, 3:9] = 1
    label_map[k, 8:10, 10:13] = 2
    return label_map


def prepared_run(tmp_path, slice_range=None) -> runs.PropagationRun:
    label_map = one_slice()
    plan = validation.plan_propagation(label_map, validation.PropagationSettings(slice_range=slice_range))
    return runs.PropagationRun.prepare(study(), label_map, plan, stand_in_tool(), parent_folder=tmp_path)


def started(run, **knobs) -> jobs.CommandJob:
    return run.start(env=environment(**knobs))


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    ("line", "expected"),
    [("PROGRESS 3 10", (3, 10)), ("  PROGRESS 0 7\r", (0, 7)), ("PROGRESS 3", None), ("progress 1 2", None),
     ("wrote out.nii.gz", None)],
)
def test_parse_progress(line, expected):
    assert jobs.parse_progress(line) == expected


def test_propagation_run_streams_progress_and_reads_the_result(tmp_path):
    run = prepared_run(tmp_path, slice_range=(2, 8))
    arguments = tmp_path / "argv.json"
    try:
        job = started(run, STAND_IN_DELAY="0.02", STAND_IN_ARGS_FILE=str(arguments))
        updates: list[jobs.JobUpdate] = []
        final = job.wait(timeout=60, on_update=updates.append)
        assert final.state is jobs.JobState.SUCCEEDED and job.returncode == 0
        fractions = [u.fraction for u in updates if u.fraction is not None]
        assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
        assert (final.done, final.total) == (6, 6)  # slices 2..8 but the labelled slice 4
        assert not any(line.startswith("PROGRESS") for line in job.log)
        result = run.read_result()
        expected = np.zeros_like(one_slice())
        expected[2:9] = one_slice()[4]
        np.testing.assert_array_equal(result, expected)
        argv = json.loads(arguments.read_text())
        assert argv[argv.index("--slices") + 1] == "2:9" and argv[argv.index("--progress") + 1] == "lines"
        assert argv[argv.index("--axis") + 1] == "k"
    finally:
        run.cleanup()
    assert not run.folder.path.exists()


@pytest.mark.parametrize(
    ("mode", "error_type", "message"),
    [
        ("fail", jobs.JobError, "exit code 1.*stand-in failure"),
        ("bad-input", jobs.BadInputError, "rejected.*labels.nii.gz: label map is empty"),
        ("no-weights", jobs.WeightsMissingError, "weights were not found.*dinov3"),
        ("terminated", jobs.JobError, "stopped by another program \\(SIGTERM"),
    ],
)
def test_failures_are_reported_with_the_tools_stderr(tmp_path, mode, error_type, message):
    run = prepared_run(tmp_path)
    try:
        job = started(run, STAND_IN_MODE=mode)
        assert job.wait(timeout=60).state is jobs.JobState.FAILED
        error = job.error()
        assert type(error) is error_type
        assert error.returncode == {"fail": 1, "bad-input": 2, "no-weights": 3, "terminated": 143}[mode]
        assert re.search(message, str(error), re.DOTALL), str(error)
        with pytest.raises(error_type):
            job.raise_for_failure()
        with pytest.raises(RuntimeError, match="has not succeeded"):
            run.read_result()
    finally:
        run.cleanup()


@POSIX_ONLY
def test_cancel_stops_the_child_and_its_grandchildren(tmp_path):
    run = prepared_run(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    try:
        job = started(run, STAND_IN_MODE="hang", STAND_IN_GRANDCHILD_PID=str(pid_file))
        assert wait_for(lambda: "stand-in is hanging" in job.poll().new_lines or "stand-in is hanging" in job.log)
        assert job.total == 10  # the first PROGRESS line arrived while the child runs
        grandchild = int(pid_file.read_text())
        assert alive(grandchild)
        began = time.monotonic()
        job.cancel(grace_seconds=5.0)
        assert job.wait(timeout=10).state is jobs.JobState.CANCELLED
        assert time.monotonic() - began < 4.0  # SIGTERM was enough, no wait for the kill
        assert isinstance(job.error(), jobs.JobCancelledError)
        assert wait_for(lambda: not alive(grandchild), timeout=5.0)
    finally:
        run.cleanup()


@POSIX_ONLY
def test_cancel_kills_a_child_that_ignores_sigterm(tmp_path):
    run = prepared_run(tmp_path)
    try:
        job = started(run, STAND_IN_MODE="hang", STAND_IN_IGNORE_TERM="1")
        assert wait_for(lambda: "stand-in is hanging" in job.poll().new_lines or "stand-in is hanging" in job.log)
        job.cancel(grace_seconds=0.5)
        final = job.wait(timeout=10)
        assert final.state is jobs.JobState.CANCELLED and job.returncode == -9
    finally:
        run.cleanup()


def test_poll_never_blocks_and_wait_times_out_by_cancelling(tmp_path):
    run = prepared_run(tmp_path)
    try:
        job = started(run, STAND_IN_MODE="hang")
        assert wait_for(lambda: job.poll().total == 10)
        durations = []
        for _ in range(20):
            began = time.perf_counter()
            assert job.poll().state is jobs.JobState.RUNNING
            durations.append(time.perf_counter() - began)
        assert max(durations) < 0.05
        with pytest.raises(TimeoutError, match="cancelled"):
            job.wait(timeout=0.3)
        assert wait_for(lambda: job.poll().state.finished, timeout=10)
        assert job.state is jobs.JobState.CANCELLED
    finally:
        run.cleanup()


def test_a_missing_executable_is_a_clear_error(tmp_path):
    job = jobs.CommandJob([str(tmp_path / "no-such-PythonSlicer"), "-m", "insid3_med"])
    with pytest.raises(jobs.JobError, match="cannot start .*no-such-PythonSlicer"):
        job.start()
    assert job.state is jobs.JobState.FAILED
    with pytest.raises(RuntimeError, match="started once"):
        job.start()


def test_a_run_starts_once_and_cleans_up_after_a_failed_export(tmp_path):
    run = prepared_run(tmp_path)
    try:
        started(run).wait(timeout=60)
        with pytest.raises(RuntimeError, match="already started"):
            run.start()
    finally:
        run.cleanup()
    rgb = Volume(np.zeros((2, 3, 4, 3), np.uint8))
    plan = validation.plan_propagation(one_slice((2, 3, 4), k=0), validation.PropagationSettings())
    before = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match="grey"):
        runs.PropagationRun.prepare(rgb, one_slice((2, 3, 4), k=0), plan, stand_in_tool(), parent_folder=tmp_path)
    assert set(tmp_path.iterdir()) == before  # the half-made exchange folder was removed


def test_transfer_run_gives_one_label_map_per_target_on_its_own_grid(tmp_path):
    reference, label_map = study(), one_slice()
    targets = [study((6, 12, 14), origin=(0.0, 0.0, 0.0)), study((9, 12, 14), origin=(1.0, 2.0, 3.0))]
    plan = validation.plan_transfer(label_map, validation.PropagationSettings(), ["t0", "t1"])
    run = runs.TransferRun.prepare(reference, label_map, targets, plan, stand_in_tool(), parent_folder=tmp_path)
    try:
        assert [p.name for p in run.output_paths] == ["target_00_seg.nii.gz", "target_01_seg.nii.gz"]
        assert run.start(env=environment()).wait(timeout=60).state is jobs.JobState.SUCCEEDED
        results = run.read_results()
        assert [r.shape for r in results] == [(6, 12, 14), (9, 12, 14)]
        for result in results:
            assert all(np.array_equal(result[k], label_map[4]) for k in range(result.shape[0]))
    finally:
        run.cleanup()


@pytest.mark.slow
def test_propagation_run_with_the_real_insid3_med_tool(tmp_path):
    """End to end with ``python -m insid3_med`` (no stand-in): real MRI, one labelled slice, small DINOv2 weights."""
    pytest.importorskip("insid3_med.cli")
    image_path = DATA / "hippocampus" / "images" / "hippocampus_007.nii.gz"
    labels_path = DATA / "hippocampus" / "labels" / "hippocampus_007.nii.gz"
    if not image_path.exists() or not STANDIN_WEIGHTS.exists():
        pytest.skip("real data or the DINOv2 stand-in weights are absent (../shared)")
    image, truth = nib.load(image_path), nib.load(labels_path)
    # What the module reads from Slicer nodes: (K, J, I) arrays and the IJKToRAS matrix (= the NIfTI affine).
    volume = conversion.volume_from_slicer(np.asarray(image.dataobj).transpose(2, 1, 0), image.affine)
    reference = np.asarray(truth.dataobj).transpose(2, 1, 0).astype(np.uint8)
    k = int(np.argmax((reference > 0).sum(axis=(1, 2))))
    label_map = np.zeros_like(reference)
    label_map[k] = reference[k]
    settings = validation.PropagationSettings(
        axis=0, slice_range=(k - 3, k + 3), device="cpu", image_size=112, weights=str(STANDIN_WEIGHTS)
    )
    plan = validation.plan_propagation(label_map, settings, volume_shape=volume.shape)
    tool = commands.module_command(sys.executable)
    run = runs.PropagationRun.prepare(volume, label_map, plan, tool, parent_folder=tmp_path)
    try:
        job = run.start(env=environment(OMP_NUM_THREADS="1"))
        final = job.wait(timeout=300)
        assert final.state is jobs.JobState.SUCCEEDED, job.error()
        assert (final.done, final.total) == (6, 6)
        result = run.read_result()
    finally:
        run.cleanup()
    assert result.shape == volume.shape
    np.testing.assert_array_equal(result[k], reference[k])  # the labelled slice is kept as given
    assert not result[: k - 3].any() and not result[k + 4 :].any()  # nothing outside the range
    assert set(np.unique(result)) <= {0, 1, 2}
