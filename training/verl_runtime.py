"""Running a prepared verl job (``tracelearn.training.verl_backend``) with the Python of verl's environment.

The job runs in its directory, in a process group of its own (verl's driver and its Ray processes),
its output streamed to the console and a log; with LoRA, verl's model merger then writes the adapter
(``tracelearn.training.verl_checkpoints``). ``launch.sh`` in the job directory does the same from a
shell, for a GPU machine without tracelearn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from tracelearn.processes import ChildProcess, ChildProcessError, ChildTimeoutError, start_child
from tracelearn.training.verl_backend import VERL_ENTRY_POINT, VerlJob
from tracelearn.training.verl_checkpoints import actor_directory, merge_command
from tracelearn.training.verl_environment import HOW_TO_INSTALL, VerlNotAvailableError

__all__ = ["SHUTDOWN_GRACE_S", "run_verl_job", "verl_command"]

# After a forwarded signal, how long the job has to shut Ray down before its process group is killed.
SHUTDOWN_GRACE_S = 60.0


def verl_command(job: VerlJob, python: str) -> list[str]:
    """The command line of ``job`` run by ``python`` (the Python of verl's environment)."""
    return [python, "-m", VERL_ENTRY_POINT, *job.overrides]


def _job_environment(job: VerlJob) -> dict[str, str]:
    environment = dict(os.environ)
    for name, value in job.environment.items():
        environment[name] = value + (os.pathsep + environment[name] if environment.get(name) else "")
    return environment


@contextlib.contextmanager
def _forwarding_sigterm(child: ChildProcess) -> Iterator[None]:
    """While inside, a SIGTERM to this process is passed on to the job (which then shuts down)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _echo(line: str) -> None:
    print(line, flush=True)


def _run(command: list[str], job: VerlJob, log_path: Path, name: str) -> int:
    """Run one command of the job; its exit status as the shell reports it (128 + signal)."""
    try:
        child = start_child(command, name=name, log=log_path, env=_job_environment(job), cwd=job.paths.directory,
                            on_line=_echo)
    except ChildProcessError as error:
        raise VerlNotAvailableError(f"{error}. {HOW_TO_INSTALL}") from error
    interrupts = 0
    with _forwarding_sigterm(child):
        while True:
            try:
                status = child.wait(SHUTDOWN_GRACE_S if interrupts else None)
                break
            except KeyboardInterrupt:
                interrupts += 1
                child.send_signal(signal.SIGINT if interrupts == 1 else signal.SIGKILL)
            except ChildTimeoutError:
                status = child.stop(grace_s=0)
                break
    return status if status >= 0 else 128 - status


def run_verl_job(job: VerlJob, python: str, log_path: Path) -> int:
    """Run ``job`` with ``python``, its output streamed to the console and to ``log_path``; its exit status.

    The job runs in its directory in a process group of its own (verl's Ray processes with its
    driver). A SIGTERM to this process, or a KeyboardInterrupt (forwarded as SIGINT), reaches the whole
    group and the job gets ``SHUTDOWN_GRACE_S`` to stop; a second KeyboardInterrupt kills it. With
    LoRA, verl's model merger runs after a successful job (its output appended to ``merge.log`` beside
    ``log_path``). Returns the exit status the shell would report (128 + the signal number for a job
    ended by a signal).
    """
    status = _run(verl_command(job, python), job, log_path, "the verl job")
    if status != 0 or not job.lora:
        return status
    merge = merge_command(python, actor_directory(job.paths.directory))
    return _run(merge, job, log_path.with_name("merge.log"), "verl's model merger")
