"""What a child needs before it starts: the program to run and a port to listen on."""

import shutil
import socket
import sys
from pathlib import Path

from tracelearn.processes.child import ChildProcessError


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (``tracelearn``, ``opentelemetry-instrument``),
    not whatever ``PATH`` finds first; raises :class:`ChildProcessError` when it is not installed."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise ChildProcessError(f"{name} is not installed in {Path(sys.executable).parent}; run scripts/bootstrap.sh")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (a child binding it may still race another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
