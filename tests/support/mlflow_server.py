"""A real MLflow tracking server for tests: ``mlflow server`` in a subprocess on a free loopback port.

The backend store is SQLite and artifacts are proxied by the server (``--serve-artifacts``, stored
under ``--artifacts-destination`` in the given directory), so clients upload and download files over
HTTP exactly as they would against a remote server. ``start`` waits until ``/health`` answers and
records how long that took (``startup_seconds``); ``stop`` terminates the whole process group (the
server forks uvicorn/gunicorn workers).

Run it by hand: ``python tests/support/mlflow_server.py /tmp/mlflow-dev``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

STARTUP_TIMEOUT_SECONDS = 120.0
STOP_GRACE_SECONDS = 2.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MlflowServer:
    """``mlflow server`` with a SQLite store and proxied local artifacts under ``root``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_seconds: float | None = None
        self.log_path = self.root / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--default-artifact-root", "mlflow-artifacts:/",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]
        started = time.monotonic()
        log = self.log_path.open("wb")
        # Its own session, so that stop() can signal the server and the workers it forks together.
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        log.close()
        while time.monotonic() - started < STARTUP_TIMEOUT_SECONDS:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - started
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer {self.url}/health in {STARTUP_TIMEOUT_SECONDS:.0f} s:\n"
                           f"{self._log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            # Uvicorn waits for clients' keep-alive connections to close; the data is throwaway.
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no server log)"

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    with MlflowServer(Path(sys.argv[1] if len(sys.argv) > 1 else "mlflow-dev")) as server:
        print(f"MLflow at {server.url} (started in {server.startup_seconds:.1f} s); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
