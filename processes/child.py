"""``start_child`` and ``ChildProcess``: one child process, its output, its readiness and its end."""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

T = TypeVar("T")

DEFAULT_GRACE_S = 30.0
# How long the output reader may lag behind the child's exit: grandchildren that outlive the child
# (Ray's workers, say) can hold the pipe open, and are then killed with the group.
OUTPUT_DRAIN_S = 10.0


class ChildProcessError(RuntimeError):
    """A child process did not do what was expected; the message ends with its last output line."""


class ChildExitedError(ChildProcessError):
    """The child exited (before it was ready, or with a failing status)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class ChildTimeoutError(ChildProcessError):
    """The child ran (or stayed unready) past its time limit; it has been stopped."""


class ChildProcess:
    """A started child: ``wait``, ``wait_until`` (readiness), ``send_signal``, ``stop``, ``tail``.

    A context manager: leaving the block stops the child if it still runs. Output lines (decoded as
    UTF-8, undecodable bytes replaced) go, in order, to the log file, to ``on_line`` and to the tail.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        name: str,
        log: IO[bytes] | None,
        on_line: Callable[[str], None] | None,
        tail_lines: int,
    ) -> None:
        self.popen = popen
        self.name = name
        self._log = log
        self._on_line = on_line
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._reader = threading.Thread(target=self._read_output, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def _read_output(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            if self._log is not None:
                self._log.write(raw)
                self._log.flush()
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._tail.append(line)
            if self._on_line is not None:
                # A failing callback must not stop the draining: the child would block on a full pipe.
                with contextlib.suppress(Exception):
                    self._on_line(line)

    def tail(self, lines: int = 1) -> str:
        """The last ``lines`` non-empty output lines, or ``(no output)``."""
        kept = [line.strip() for line in self._tail if line.strip()]
        return "\n".join(kept[-lines:]) if kept else "(no output)"

    def _log_note(self) -> str:
        return f" (log: {self._log.name})" if self._log is not None else ""

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group (nothing if it is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout_s: float | None = None) -> int:
        """The exit status (negative: killed by that signal); past ``timeout_s`` the child is stopped and
        :class:`ChildTimeoutError` raised."""
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop(grace_s=5.0)
            raise ChildTimeoutError(f"{self.name} ran past its timeout of {timeout_s:.0f} s and was killed; "
                                    f"last line: {self.tail()}{self._log_note()}") from None
        except BaseException:  # Ctrl-C or SIGTERM while waiting: the child (own session) must not outlive us
            self.stop(grace_s=5.0)
            raise
        self._finish_output()
        return code

    def check(self, timeout_s: float | None = None) -> None:
        """``wait``, raising :class:`ChildExitedError` unless the child exited with status 0."""
        code = self.wait(timeout_s)
        if code != 0:
            raise ChildExitedError(f"{self.name} exited with code {code}: {self.tail()}{self._log_note()}", code)

    def wait_until(self, probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.25) -> T:
        """Call ``probe`` until it returns something other than ``None`` and return it.

        Raises :class:`ChildExitedError` as soon as the child exits, :class:`ChildTimeoutError` (the child
        stopped) when ``timeout_s`` passes first. ``what`` names the awaited state in the messages.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.popen.poll()
            if code is not None:
                self._finish_output()
                raise ChildExitedError(
                    f"{self.name} exited with code {code} before {what}: {self.tail()}{self._log_note()}", code
                )
            result = probe()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                self.stop(grace_s=5.0)
                raise ChildTimeoutError(
                    f"{self.name} timed out after {timeout_s:.0f} s waiting until {what}, and was stopped; "
                    f"last line: {self.tail()}{self._log_note()}"
                )
            time.sleep(interval_s)

    def stop(self, grace_s: float = DEFAULT_GRACE_S, signum: int = signal.SIGTERM) -> int:
        """``signum`` (SIGTERM) to the group, then SIGKILL to the group after ``grace_s``; the exit status."""
        if self.popen.poll() is None:
            self.send_signal(signum)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.popen.wait()
        self._finish_output()
        return self.popen.returncode

    def _finish_output(self) -> None:
        self._reader.join(timeout=OUTPUT_DRAIN_S)
        if self._reader.is_alive():
            # The child is gone but something it started still holds the output open: an orphan.
            self.send_signal(signal.SIGKILL)
            self._reader.join()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self._log is not None and not self._log.closed:
            self._log.close()

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def _shown(argument: str, limit: int = 200) -> str:
    """A command-line argument as the log's first line shows it: a long one (a program text) elided."""
    return argument if len(argument) <= limit else f"<{len(argument)} characters>"


def start_child(
    command: Sequence[str],
    *,
    name: str,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 50,
) -> ChildProcess:
    """Start ``command`` in a session of its own, stdin closed, stdout and stderr read line by line.

    ``log``: a file that receives the command line (``$ ...``) and then the output; ``env`` replaces
    the environment when given; ``on_line`` gets each output line. Raises :class:`ChildProcessError`
    when the program cannot be started (not found, not executable), naming it.
    """
    log_file = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = log.open("wb")
        log_file.write(f"$ {shlex.join(_shown(argument) for argument in command)}\n".encode())
        log_file.flush()
    try:
        popen = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as error:
        if log_file is not None:
            log_file.close()
        raise ChildProcessError(f"{name}: cannot start {command[0]!r}: {error}") from None
    return ChildProcess(popen, name, log_file, on_line, tail_lines)
