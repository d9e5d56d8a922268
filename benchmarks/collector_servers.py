"""The collector ingest benchmark's servers as child processes: the sidecar and ``agl store``.

Starting each and waiting until it serves, its CPU seconds and storage writes read from ``/proc``
(the process and its descendants), its exit reaped with ``os.wait4``, agl rollouts created through
its REST API, the sidecar's ``/status`` (is every acknowledged span in Parquet yet).
Part of ``collector_ingest.py`` (see its docstring).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tracelearn.serving.http_server import free_port

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules; spawned client processes re-import them
    sys.path.insert(0, str(HERE))

from collector_workload import AglIdentity, Workload  # noqa: E402

DEFAULT_AGL = HERE / ".venv-agl" / "bin" / "agl"
TRACELEARN = Path(sys.executable).parent / "tracelearn"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The sidecar's TRACELEARN_ROLL_SECONDS in these runs (see ``start_sidecar``).
ROLL_SECONDS = 2.0
# How long to wait, after the last answer, for every acknowledged span to be in Parquet.
CONVERSION_TIMEOUT_S = 600.0
# How often to ask whether they are (see ``wait_for_conversion``).
CONVERSION_POLL_S = 0.25

Target = Literal["tracelearn", "agl"]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    pids, index = [pid], 0
    while index < len(pids):
        current = pids[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pids.extend(int(child) for child in (task / "children").read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants, all threads (``/proc/PID/stat``)."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{each}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def storage_write_bytes(pid: int) -> int:
    """Bytes ``pid`` and its descendants caused to be written to storage (``/proc/PID/io`` write_bytes)."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
    return total


@dataclass
class ServerExit:
    """How a server process ended: exit code and its whole-life CPU seconds (``os.wait4``)."""

    returncode: int
    cpu_s: float
    log_tail: str


@dataclass
class ServerProcess:
    """A server (the sidecar or ``agl store``) running as a child process, output in ``log``."""

    target: Target
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    data: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def write_bytes(self) -> int:
        return storage_write_bytes(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> ServerExit:
        """Send ``sig``, reap the process (SIGKILL after ``timeout``) and return its exit and CPU."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        status, usage = 0, None
        while self.process.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline = math.inf
            time.sleep(0.02)
        cpu = usage.ru_utime + usage.ru_stime if usage is not None else math.nan
        return ServerExit(self.process.returncode, cpu, log_tail(self.log))


def log_tail(path: Path, lines: int = 12) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def http_json(url: str, body: Any = None, timeout: float = 30.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_until(what: str, condition: Any, process: subprocess.Popen[bytes], log: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before {what}:\n{log_tail(log, 30)}")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
            answer = condition()
            if answer:
                return answer
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}:\n{log_tail(log, 30)}")


def start_sidecar(
    data: Path,
    log: Path,
    queue_bytes: int | None = None,
    extra: Sequence[str] = (),
    roll_seconds: float = ROLL_SECONDS,
) -> ServerProcess:
    """``tracelearn collector serve --data DATA --http 127.0.0.1:0 --grpc ''``; returns once ``/ready`` is 200.

    ``roll_seconds`` (``TRACELEARN_ROLL_SECONDS``): how old a request log segment gets before it is
    converted into Parquet; short, so the conversion runs during the run, as in a long-lived collector.
    """
    command = [str(TRACELEARN), "collector", "serve", "--data", str(data), "--http", "127.0.0.1:0", "--grpc", ""]
    if queue_bytes is not None:
        command += ["--queue-bytes", str(queue_bytes)]
    command += list(extra)
    env = {**os.environ, "TRACELEARN_ROLL_SECONDS": str(roll_seconds)}
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def banner() -> tuple[str, int] | None:
        match = re.search(r"OTLP/HTTP on http://([\d.]+):(\d+)", log.read_text(errors="replace"))
        return (match.group(1), int(match.group(2))) if match else None

    host, port = _wait_until("its OTLP/HTTP banner", banner, process, log, 60)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5) as response:
            return bool(response.status == 200)

    _wait_until("/ready", ready, process, log, 120)
    return ServerProcess("tracelearn", process, host, port, log, data)


def start_agl_store(log: Path, agl: Path = DEFAULT_AGL) -> ServerProcess:
    """``agl store --host 127.0.0.1 --port N`` (memory backend, its default); returns once healthy."""
    if not agl.exists():
        raise FileNotFoundError(f"{agl}: no agl command; run benchmarks/setup_agentlightning.sh once")
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    command = [str(agl), "store", "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = ServerProcess("agl", process, "127.0.0.1", port, log)
    _wait_until("agl health", lambda: http_json(f"{server.url}/v1/agl/health", timeout=5), process, log, 120)
    return server


def create_agl_rollouts(server: ServerProcess, count: int) -> list[AglIdentity]:
    """``count`` rollouts with a started attempt each, through agl's REST API."""
    created = []
    for index in range(count):
        answer = http_json(f"{server.url}/v1/agl/rollouts", {"input": {"task": index}})
        created.append(AglIdentity(answer["rollout_id"], answer["attempt"]["attempt_id"]))
    return created


def agl_statistics(server: ServerProcess) -> dict[str, Any]:
    """The store's ``/v1/agl/statistics`` (``total_spans``, ``total_rollouts``, ...)."""
    answer: dict[str, Any] = http_json(f"{server.url}/v1/agl/statistics")
    return answer


def wait_for_conversion(server: ServerProcess, timeout: float = CONVERSION_TIMEOUT_S) -> tuple[float, float] | None:
    """Wait until the sidecar has every acknowledged span in Parquet; (its CPU seconds then, seconds waited).

    Asks ``/metrics`` (counters only) every ``CONVERSION_POLL_S``: the server's CPU is what is measured,
    and ``/status`` walks the dataset on every call (asked 20 times a second, answering it took ~4.5% of
    the sidecar's busy samples in a 60k-span run, py-spy). The CPU read when done does not grow while idle.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        gauges = conversion_gauges(server)
        if gauges["spans_awaiting_conversion"] == 0 and gauges["conversion_backlog_bytes"] == 0:
            return server.cpu_seconds(), time.monotonic() - started
        time.sleep(CONVERSION_POLL_S)
    return None


def conversion_gauges(server: ServerProcess) -> dict[str, float]:
    """The sidecar's ``spans_awaiting_conversion`` and ``conversion_backlog_bytes`` from ``/metrics``."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    gauges = {}
    for name in ("spans_awaiting_conversion", "conversion_backlog_bytes"):
        match = re.search(rf"^tracelearn_collector_{name} (\S+)$", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"{server.url}/metrics has no tracelearn_collector_{name}")
        gauges[name] = float(match.group(1))
    return gauges


def sidecar_status(server: ServerProcess) -> dict[str, Any]:
    answer: dict[str, Any] = http_json(f"{server.url}/status")
    return answer


def start_target(target: Target, workdir: Path, workload: Workload, queue_bytes: int | None = None,
                 agl: Path = DEFAULT_AGL) -> tuple[ServerProcess, Workload]:
    """Start ``target`` fresh under ``workdir``; for agl, create the workload's rollouts in it (and rename them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if target == "tracelearn":
        return start_sidecar(workdir / "data", workdir / "sidecar.log", queue_bytes), workload
    server = start_agl_store(workdir / "agl.log", agl)
    try:
        identities = create_agl_rollouts(server, len(workload.identities))
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server, workload.with_identities(identities)


