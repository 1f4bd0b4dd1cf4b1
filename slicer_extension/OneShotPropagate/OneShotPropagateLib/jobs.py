"""Run a long command in a child process without blocking the caller: progress, log, cancel, errors.

The caller (Slicer's main thread, through a ``QTimer``) calls :meth:`CommandJob.poll` now and then; two reader
threads collect the child's stdout and stderr meanwhile, so ``poll`` never waits. Lines ``PROGRESS <done>
<total>`` on stdout update the progress; every other line goes to the log. :meth:`CommandJob.cancel` asks the
child's whole process group to stop (SIGTERM; ``taskkill /T`` on Windows) and kills it after a grace period, so a
launcher such as ``PythonSlicer`` and the interpreter it starts both go. No Slicer or Qt import here.
"""

from __future__ import annotations

import collections
import enum
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .commands import EXIT_BAD_INPUT, EXIT_TERMINATED, EXIT_WEIGHTS_MISSING

PROGRESS_LINE = re.compile(r"^\s*PROGRESS\s+(\d+)\s+(\d+)\s*$")
_EOF = None


class JobState(str, enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobError(RuntimeError):
    """The child failed; ``returncode`` and the tail of its ``stderr`` are kept for the error dialog."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message)


class BadInputError(JobError):
    """The tool rejected its input (exit code 2): the message names the file and the problem."""


class WeightsMissingError(JobError):
    """The tool found no backbone weights (exit code 3): ask the user for a weights file."""


class JobCancelledError(JobError):
    """The user cancelled the job."""


@dataclass(frozen=True)
class JobUpdate:
    """What :meth:`CommandJob.poll` saw: state, progress ``done``/``total`` slices, log lines since last poll."""

    state: JobState
    done: int
    total: int
    new_lines: tuple[str, ...]

    @property
    def fraction(self) -> float | None:
        """Progress in [0, 1], ``None`` before the first PROGRESS line."""
        return min(self.done / self.total, 1.0) if self.total > 0 else None


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(done, total)`` from a ``PROGRESS <done> <total>`` line, else ``None``."""
    match = PROGRESS_LINE.match(line)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _read_lines(stream, source: str, sink: queue.Queue) -> None:
    try:
        for line in iter(stream.readline, ""):
            sink.put((source, line.rstrip("\r\n")))
    except (OSError, ValueError):
        pass  # stream closed under us during a kill
    finally:
        sink.put((source, _EOF))


class CommandJob:
    """One child process running ``command``.

    ``env``: the child's full environment (``None``: inherit), ``PYTHONUNBUFFERED=1`` is added so that progress
    arrives as it happens. ``log_limit``: log lines kept in :attr:`log`; ``stderr_limit``: stderr lines kept for
    error messages.
    """

    def __init__(
        self,
        command: Sequence[str | Path],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_limit: int = 5000,
        stderr_limit: int = 40,
    ) -> None:
        if not command:
            raise ValueError("empty command")
        self.command = [str(part) for part in command]
        self._env = dict(os.environ if env is None else env)
        self._env["PYTHONUNBUFFERED"] = "1"
        self._env.setdefault("PYTHONIOENCODING", "utf-8")
        self._cwd = None if cwd is None else str(cwd)
        self.log: collections.deque[str] = collections.deque(maxlen=log_limit)
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_limit)
        self._lines: queue.Queue = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []
        self._open_streams = 0
        self._exited_at: float | None = None
        self._cancel_requested = False
        self._state = JobState.NOT_STARTED
        self.done = 0
        self.total = 0
        self.returncode: int | None = None

    @property
    def state(self) -> JobState:
        return self._state

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def stderr_tail(self) -> str:
        """The last lines the child wrote to stderr."""
        return "\n".join(self._stderr)

    def start(self) -> CommandJob:
        """Start the child; raises :class:`JobError` when it cannot be started (e.g. executable not found)."""
        if self._state is not JobState.NOT_STARTED:
            raise RuntimeError("a CommandJob can be started once")
        options: dict = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            options["start_new_session"] = True  # own process group, so cancel reaches grandchildren
        try:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=self._env,
                cwd=self._cwd,
                **options,
            )
        except OSError as error:
            self._state = JobState.FAILED
            raise JobError(f"cannot start {self.command[0]}: {error}") from error
        self._state = JobState.RUNNING
        for source, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            reader = threading.Thread(target=_read_lines, args=(stream, source, self._lines), daemon=True)
            reader.start()
            self._readers.append(reader)
        self._open_streams = 2
        return self

    def poll(self) -> JobUpdate:
        """Collect what the child wrote since the last call and its state; never blocks."""
        new_lines: list[str] = []
        while True:
            try:
                source, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is _EOF:
                self._open_streams -= 1
                continue
            progress = parse_progress(line) if source == "stdout" else None
            if progress is not None:
                self.done, self.total = progress
                continue
            if source == "stderr":
                self._stderr.append(line)
            self.log.append(line)
            new_lines.append(line)
        if self._state is JobState.RUNNING and self._process is not None:
            code = self._process.poll()
            if code is not None:
                if self._exited_at is None:
                    self._exited_at = time.monotonic()
                # Wait for the readers to drain the pipes, unless a grandchild keeps them open too long.
                if self._open_streams <= 0 or time.monotonic() - self._exited_at > 2.0:
                    self.returncode = code
                    if self._cancel_requested:
                        self._state = JobState.CANCELLED
                    elif code == 0:
                        self._state = JobState.SUCCEEDED
                    else:
                        self._state = JobState.FAILED
        return JobUpdate(self._state, self.done, self.total, tuple(new_lines))

    def cancel(self, grace_seconds: float = 5.0) -> None:
        """Ask the child (and its process group) to stop; kill it if still alive after ``grace_seconds``.

        Returns at once; :meth:`poll` reports ``CANCELLED`` once the child is gone.
        """
        process = self._process
        if process is None or self._state is not JobState.RUNNING or process.poll() is not None:
            if self._state is JobState.NOT_STARTED:
                self._state = JobState.CANCELLED
            return
        self._cancel_requested = True
        self._signal_group(process, kill=False)

        def escalate() -> None:
            try:
                process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self._signal_group(process, kill=True)

        threading.Thread(target=escalate, daemon=True).start()

    @staticmethod
    def _signal_group(process: subprocess.Popen, kill: bool) -> None:
        try:
            if os.name == "nt":
                subprocess.run(
                    ["taskkill", "/T", "/F", "/PID", str(process.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
                if kill:
                    process.kill()
            else:
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            if kill:
                try:
                    process.kill()
                except OSError:
                    pass

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.05,
        on_update: Callable[[JobUpdate], None] | None = None,
    ) -> JobUpdate:
        """Poll until the job finishes (a blocking helper for scripts and tests; Slicer's UI uses a QTimer).

        On ``timeout`` seconds the job is cancelled and ``TimeoutError`` raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            update = self.poll()
            if on_update is not None:
                on_update(update)
            if update.state.finished:
                return update
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(grace_seconds=1.0)
                raise TimeoutError(f"{self.command[0]} did not finish within {timeout} s; it was cancelled")
            time.sleep(poll_interval)

    def error(self) -> JobError | None:
        """The error to report for a failed or cancelled job (``None`` while running or after success)."""
        tail = self.stderr_tail
        detail = f"\n\n{tail}" if tail else ""
        if self._state is JobState.CANCELLED:
            return JobCancelledError("Cancelled by the user.", returncode=self.returncode, stderr=tail)
        if self._state is not JobState.FAILED:
            return None
        code = self.returncode
        if code == EXIT_BAD_INPUT:
            return BadInputError(f"The input was rejected:{detail}", returncode=code, stderr=tail)
        if code == EXIT_WEIGHTS_MISSING:
            return WeightsMissingError(f"The backbone weights were not found:{detail}", returncode=code, stderr=tail)
        if code == EXIT_TERMINATED:
            return JobError(f"The process was stopped by another program (SIGTERM: a shutdown, a job scheduler?); "
                            f"nothing partial was kept.{detail}", returncode=code, stderr=tail)
        if code is not None and code < 0:
            return JobError(
                f"The process was stopped by signal {-code} (out of memory?).{detail}", returncode=code, stderr=tail
            )
        return JobError(f"The process failed with exit code {code}.{detail}", returncode=code, stderr=tail)

    def raise_for_failure(self) -> None:
        """Raise :meth:`error` for a failed or cancelled job; do nothing otherwise."""
        error = self.error()
        if error is not None:
            raise error
