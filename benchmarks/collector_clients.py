"""The collector ingest benchmark's load generator: client processes, one keep-alive connection per thread.

``run_clients`` spawns processes (``multiprocessing`` spawn, so they never share the server's GIL),
each encoding its bodies before the start, then sending them (or new ones until a deadline) and
resending a body answered 429/503 after its ``Retry-After``; it reads the server's CPU at the start
and the end, and can SIGKILL the server once a number of spans is acknowledged.
Part of ``collector_ingest.py`` (see its docstring).
"""

from __future__ import annotations

import http.client
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules; spawned client processes re-import them
    sys.path.insert(0, str(HERE))

from collector_servers import ServerProcess  # noqa: E402
from collector_workload import BodyMaker, Workload  # noqa: E402

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
REQUEST_TIMEOUT_S = 120.0
# After this many connection failures in a row a client thread gives up (the server is gone).
MAX_CONSECUTIVE_ERRORS = 20


@dataclass(frozen=True)
class ClientPlan:
    """What one client process sends: per thread the bodies (``None``: new ones until the deadline)."""

    host: str
    port: int
    workload: Workload
    threads: tuple[tuple[int, tuple[int, ...] | None], ...]  # (global thread index, bodies)
    total_threads: int
    duration_s: float | None = None
    stop_on_connection_error: bool = False


@dataclass
class ClientReport:
    """What clients saw, merged over threads and processes."""

    acked: list[int] = field(default_factory=list)  # bodies answered 200
    accepted_latency_s: list[float] = field(default_factory=list)  # per accepted attempt
    rejected_latency_s: list[float] = field(default_factory=list)  # per 429/503 attempt
    body_latency_s: list[float] = field(default_factory=list)  # first attempt to 200, retries included
    statuses: Counter[str] = field(default_factory=Counter)
    partial_rejected_spans: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    unanswered: list[int] = field(default_factory=list)  # bodies sent whose answer never came
    abandoned: list[int] = field(default_factory=list)  # rejected bodies given up at the deadline
    failed: list[int] = field(default_factory=list)  # bodies answered with another error status
    started_at: float = math.inf
    finished_at: float = 0.0

    def merge(self, other: ClientReport) -> None:
        self.acked += other.acked
        self.accepted_latency_s += other.accepted_latency_s
        self.rejected_latency_s += other.rejected_latency_s
        self.body_latency_s += other.body_latency_s
        self.statuses.update(other.statuses)
        self.partial_rejected_spans += other.partial_rejected_spans
        self.errors += other.errors
        self.error_samples += other.error_samples[: max(0, 5 - len(self.error_samples))]
        self.unanswered += other.unanswered
        self.abandoned += other.abandoned
        self.failed += other.failed
        self.started_at = min(self.started_at, other.started_at)
        self.finished_at = max(self.finished_at, other.finished_at)

    @property
    def rejected_attempts(self) -> int:
        return self.statuses["429"] + self.statuses["503"]


def _connect(host: str, port: int) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    connection.connect()
    assert connection.sock is not None
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _client_thread(
    plan: ClientPlan,
    thread: int,
    bodies: Sequence[int] | None,
    encoded: dict[int, bytes],
    maker: BodyMaker,
    lock: threading.Lock,
    deadline: float,
    acked_spans: Any,
    report: ClientReport,
) -> None:
    """Send this thread's bodies in turn; on 429/503 wait ``Retry-After`` and resend the same body."""
    connection: http.client.HTTPConnection | None = None
    headers = {"Content-Type": PROTOBUF}
    consecutive_errors = 0
    sequence = iter(bodies) if bodies is not None else (thread + n * plan.total_threads for n in range(1 << 40))
    try:
        for body_index in sequence:
            if plan.duration_s is not None and time.monotonic() >= deadline:
                break
            if body_index in encoded:
                body = encoded.pop(body_index)
            else:
                with lock:
                    body = maker.body(body_index)
            first_attempt = time.monotonic()
            report.started_at = min(report.started_at, first_attempt)
            while True:
                sent_at = time.monotonic()
                try:
                    if connection is None:
                        connection = _connect(plan.host, plan.port)
                    connection.request("POST", TRACES_PATH, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    status = response.status
                    retry_after = response.getheader("Retry-After")
                    if response.getheader("Connection", "").lower() == "close":
                        connection.close()
                        connection = None
                except (OSError, http.client.HTTPException) as error:
                    report.errors += 1
                    consecutive_errors += 1
                    if len(report.error_samples) < 5:
                        report.error_samples.append(f"{type(error).__name__}: {error}")
                    if connection is not None:
                        connection.close()
                        connection = None
                    if plan.stop_on_connection_error or consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                        report.unanswered.append(body_index)
                        return
                    time.sleep(0.05 * consecutive_errors)
                    continue
                consecutive_errors = 0
                answered_at = time.monotonic()
                report.statuses[str(status)] += 1
                if status == 200:
                    report.accepted_latency_s.append(answered_at - sent_at)
                    report.body_latency_s.append(answered_at - first_attempt)
                    if payload:
                        report.partial_rejected_spans += ExportTraceServiceResponse.FromString(
                            payload
                        ).partial_success.rejected_spans
                    report.acked.append(body_index)
                    report.finished_at = max(report.finished_at, answered_at)
                    with acked_spans.get_lock():
                        acked_spans.value += plan.workload.spans_in(body_index)
                    break
                if status in (429, 503):
                    report.rejected_latency_s.append(answered_at - sent_at)
                    wait = float(retry_after) if retry_after else 1.0
                    if plan.duration_s is not None and answered_at + wait >= deadline:
                        report.abandoned.append(body_index)
                        report.finished_at = max(report.finished_at, answered_at)
                        return
                    time.sleep(wait)
                    continue
                report.failed.append(body_index)
                if len(report.error_samples) < 5:
                    report.error_samples.append(f"HTTP {status}: {payload[:200]!r}")
                break
    finally:
        if connection is not None:
            connection.close()


def _client_process(plan: ClientPlan, go: Any, go_at: Any, ready: Any, results: Any, acked_spans: Any) -> None:
    """One client process: encode its bodies, wait for ``go``, run one thread per connection."""
    try:
        maker = BodyMaker(plan.workload)
        encoded: dict[int, bytes] = {}
        for _, bodies in plan.threads:
            for body_index in bodies or ():
                encoded[body_index] = maker.body(body_index)
        ready.put(os.getpid())
        go.wait()
        deadline = go_at.value + (plan.duration_s or 0.0)
        reports = [ClientReport() for _ in plan.threads]
        lock = threading.Lock()  # bodies made on the fly (timed runs) reuse the maker's messages
        threads = [
            threading.Thread(
                target=_client_thread,
                args=(plan, index, bodies, encoded, maker, lock, deadline, acked_spans, reports[n]),
                daemon=True,
            )
            for n, (index, bodies) in enumerate(plan.threads)
        ]
        for each in threads:
            each.start()
        for each in threads:
            each.join()
        merged = ClientReport()
        for each_report in reports:
            merged.merge(each_report)
        results.put(merged)
    except BaseException as error:  # reported to the parent, which would otherwise wait forever
        results.put(f"client process {os.getpid()} failed: {type(error).__name__}: {error}")
        raise


@dataclass
class ClientRun:
    """A whole load-generator run: the merged report, and the server CPU over it."""

    report: ClientReport
    go_at: float
    server_cpu_s: float
    server_cpu_at_go: float
    killed_at_spans: int | None = None

    @property
    def wall_s(self) -> float:
        return max(self.report.finished_at - self.go_at, 1e-9)


def run_clients(
    server: ServerProcess,
    workload: Workload,
    connections: int,
    processes: int | None = None,
    bodies: Sequence[int] | None = None,
    duration_s: float | None = None,
    stop_on_connection_error: bool = False,
    kill_after_spans: int | None = None,
) -> ClientRun:
    """Drive ``server`` with ``connections`` keep-alive connections spread over ``processes`` processes.

    ``bodies``: send exactly these (round-robin over connections); ``duration_s``: new bodies until then.
    ``kill_after_spans``: SIGKILL the server once clients have that many spans acknowledged.
    """
    processes = min(processes or connections, connections)
    context = mp.get_context("spawn")
    go, ready, results = context.Event(), context.Queue(), context.Queue()
    go_at = context.Value("d", 0.0)
    acked_spans = context.Value("q", 0)
    assignment: list[list[tuple[int, tuple[int, ...] | None]]] = [[] for _ in range(processes)]
    for thread in range(connections):
        mine = tuple(bodies[thread::connections]) if bodies is not None else None
        assignment[thread % processes].append((thread, mine))
    workers = [
        context.Process(
            target=_client_process,
            args=(
                ClientPlan(server.host, server.port, workload, tuple(threads), connections, duration_s,
                           stop_on_connection_error),
                go, go_at, ready, results, acked_spans,
            ),
            daemon=True,
        )
        for threads in assignment
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=600)
        cpu_at_go = server.cpu_seconds()
        go_at.value = time.monotonic()
        go.set()
        killed_at = None
        if kill_after_spans is not None:
            give_up = time.monotonic() + 600
            while acked_spans.value < kill_after_spans and time.monotonic() < give_up:
                time.sleep(0.002)
            killed_at = acked_spans.value
            server.stop(signal.SIGKILL)
        merged = ClientReport()
        for _ in workers:
            answer = results.get(timeout=3600)
            if isinstance(answer, str):
                raise RuntimeError(answer)
            merged.merge(answer)
        cpu_after = server.cpu_seconds() if server.process.returncode is None else math.nan
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    return ClientRun(merged, go_at.value, cpu_after - cpu_at_go, cpu_at_go, killed_at)

