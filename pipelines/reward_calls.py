"""Calling a user reward function with a deadline per call: in a worker process that can be killed.

A Python call that hangs cannot be interrupted from another thread, so the calls of one build bucket
run in one worker process (``tracelearn.pipelines.reward_worker``, started with ``tracelearn.processes``):
the input rows go to it as Arrow in chunks, sent by a feeder thread, and each reply is awaited for at
most ``timeout_s`` seconds. A call that does not answer in time is counted as timed out, the worker is killed (its
process group, so whatever the function started goes too) and a fresh one takes the calls after it.
After ``STOP_AFTER_TIMEOUTS`` timeouts in a row the function is not called again in this build: the
remaining calls are counted as timed out too, so a function that hangs on everything costs
``STOP_AFTER_TIMEOUTS x timeout_s`` per bucket, not one timeout per rollout. A worker that dies during a call
(``os._exit``, a crash) fails that call and is replaced.

The worker's output (the function's prints) is copied to this process's stderr, line by line, each
line prefixed with the function's path.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from tracelearn.processes import ChildProcess, ChildProcessError, start_child

__all__ = ["STOP_AFTER_TIMEOUTS", "RewardCallOutcome", "RewardWorkerError", "call_reward_function"]

STOP_AFTER_TIMEOUTS = 3
CHUNK_CALLS = 32
STARTUP_TIMEOUT_S = 120.0  # importing the user's module (and what it imports) may be slow
ACCEPT_POLL_S = 0.1
WORKER_PROGRAM = Path(__file__).with_name("reward_worker.py")

Outcome = Literal["ok", "errors", "invalid", "timeouts"]


class RewardWorkerError(RuntimeError):
    """The worker process could not start or import the reward function: no call can be made."""


@dataclass(frozen=True)
class RewardCallOutcome:
    """One call's outcome: ``ok`` with ``rewards``, else the failure cause and a message naming it."""

    outcome: Outcome
    rewards: dict[str, float] = field(default_factory=dict)
    message: str = ""


class _Worker:
    """One worker process, its connection and the thread feeding it calls."""

    def __init__(self, setup: Mapping[str, Any], scratch: Path) -> None:
        self.path = path = str(setup["function"])
        self.feed_error: Exception | None = None
        address = str(scratch / "worker.sock")  # a Unix socket path holds at most ~100 bytes: keep it short
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
            listener.listen(1)
            listener.settimeout(ACCEPT_POLL_S)
            self.child: ChildProcess = start_child(
                [sys.executable, str(WORKER_PROGRAM), address],
                name=f"reward function {path}",
                on_line=lambda line: print(f"[{path}] {line}", file=sys.stderr, flush=True),
                tail_lines=20,
            )
            accepted = self._accept(listener)
        except (OSError, ChildProcessError) as error:
            raise RewardWorkerError(f"cannot start a worker process for reward function {path}: {error}") from error
        finally:
            listener.close()
            Path(address).unlink(missing_ok=True)
        accepted.setblocking(True)
        self.connection = Connection(accepted.detach())
        self.connection.send({**setup, "import_path": list(sys.path)})  # see reward_worker, step 1
        status, message = self.receive(STARTUP_TIMEOUT_S) or ("failed", f"no answer in {STARTUP_TIMEOUT_S:.0f} s")
        if status != "ready":
            self.stop()
            raise RewardWorkerError(f"reward function {path} cannot run in a worker process: {message}")

    def _accept(self, listener: socket.socket) -> socket.socket:
        """The worker's connection; fails fast if it exits first, and after ``STARTUP_TIMEOUT_S``."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                accepted, _ = listener.accept()
                return accepted
            except TimeoutError:
                pass
            if self.child.returncode is not None or time.monotonic() > deadline:
                self.child.stop(grace_s=1.0, signum=signal.SIGKILL)
                raise RewardWorkerError(
                    f"the worker process for reward function {self.path} did not start "
                    f"({self.exit_status()}): {self.child.tail()}"
                )

    def feed(self, rows: Callable[[int, int], bytes], start: int, count: int) -> None:
        """Send the rows of calls ``start..count-1`` from a thread: a send may block while a call hangs."""

        def send_all() -> None:
            try:
                for first in range(start, count, CHUNK_CALLS):
                    self.connection.send_bytes(rows(first, min(first + CHUNK_CALLS, count)))
            except OSError:
                pass  # the worker was stopped: the calls left are sent to the next one
            except Exception as error:  # rows that cannot be prepared: the build must fail, not wait
                self.feed_error = error
                with contextlib.suppress(OSError):
                    self.connection.close()

        threading.Thread(target=send_all, name=f"reward-feeder-{self.path}", daemon=True).start()

    def receive(self, timeout_s: float) -> tuple[str, Any] | None:
        """The next reply, ``None`` after ``timeout_s``; raises ``EOFError`` when the worker is gone."""
        if not self.connection.poll(timeout_s):
            return None
        reply: tuple[str, Any] = self.connection.recv()
        return reply

    def exit_status(self) -> str:
        try:
            code = self.child.wait(timeout_s=10.0)
        except ChildProcessError:
            return "closed its connection"
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def stop(self) -> None:
        self.connection.close()
        self.child.stop(grace_s=1.0, signum=signal.SIGKILL)


def call_reward_function(
    setup: Mapping[str, Any], count: int, rows: Callable[[int, int], bytes], timeout_s: float
) -> Generator[RewardCallOutcome, None, None]:
    """Call a reward function ``count`` times and yield one outcome per call, in order (see the module
    docstring). ``setup`` says which function and how to call it (``reward_worker``'s protocol, step 1:
    ``function``, ``name``, ``parameters``, ``takes_any_keyword``); ``rows(start, stop)`` is the Arrow
    IPC stream of the input rows of calls ``start..stop-1``. Raises :class:`RewardWorkerError` when no
    worker can run the function at all.
    """
    path = str(setup["function"])
    position = 0
    lost: list[RewardCallOutcome] = []  # the calls in a row that cost a worker (timed out, or it died)
    with tempfile.TemporaryDirectory(prefix="tracelearn-reward-") as scratch:
        while position < count:
            if len(lost) >= STOP_AFTER_TIMEOUTS:
                yield from _not_called(path, lost, count - position, timeout_s)
                return
            worker = _Worker(setup, Path(scratch))
            try:
                worker.feed(rows, position, count)
                while position < count:
                    try:
                        reply = worker.receive(timeout_s)
                    except (EOFError, OSError):
                        if worker.feed_error is not None:
                            raise worker.feed_error from None
                        reply = ("died", f"the process running {path} {worker.exit_status()} during this call")
                    position += 1
                    if reply is None:
                        lost.append(
                            RewardCallOutcome(
                                "timeouts", message=f"{path} did not return within {timeout_s:g} s and was stopped"
                            )
                        )
                        yield lost[-1]
                        break
                    kind, payload = reply
                    if kind == "died":
                        lost.append(RewardCallOutcome("errors", message=payload))
                        yield lost[-1]
                        break
                    lost.clear()
                    if kind == "ok":
                        yield RewardCallOutcome("ok", rewards=payload)
                    else:
                        yield RewardCallOutcome("invalid" if kind == "invalid" else "errors", message=payload)
            finally:
                worker.stop()


def _not_called(path: str, lost: list[RewardCallOutcome], left: int, timeout_s: float) -> Iterator[RewardCallOutcome]:
    """The outcomes of the calls not made after ``STOP_AFTER_TIMEOUTS`` lost calls in a row (counted as the last)."""
    last = lost[-1].outcome
    why = f"timed out ({timeout_s:g} s)" if last == "timeouts" else "ended its process"
    message = (
        f"{path} was not called: it {why} on {len(lost)} rollouts in a row, so the {left} rollouts "
        "left in this bucket got no reward from it"
    )
    for _ in range(left):
        yield RewardCallOutcome(last, message=message)
