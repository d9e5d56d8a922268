"""Child processes: every program tracelearn starts (a model server, an agent, a verl job, Airflow's
``dag.test()`` in a fresh interpreter, the collector sidecar in the demo and the benchmarks) is
started, watched and stopped here, one way.

A child runs in a session (process group) of its own, so stopping it reaches whatever it started and
nothing else; its stdout and stderr are read line by line by a thread (teed to a log file, to a
callback, and into a short tail kept for error messages), so a chatty child never blocks on a full
pipe; readiness is polled while watching for an early exit; stopping is SIGTERM to the group, then
SIGKILL after a grace period.

May import: the standard library only (training, serving, the CLI and the benchmarks all use it).
"""

from tracelearn.processes.child import (
    ChildExitedError,
    ChildProcess,
    ChildProcessError,
    ChildTimeoutError,
    start_child,
)
from tracelearn.processes.programs import console_script, free_port

__all__ = [
    "ChildExitedError",
    "ChildProcess",
    "ChildProcessError",
    "ChildTimeoutError",
    "console_script",
    "free_port",
    "start_child",
]
