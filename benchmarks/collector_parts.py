"""The collector ingest benchmark's parts: ingest (and side by side with agl store), load, crash,
and the check of acknowledged spans against the Parquet dataset.

Each part starts fresh servers in a work directory, drives them with ``collector_clients`` and
returns a result dataclass; ``collector_ingest`` prints them. Part of ``collector_ingest.py``
(see its docstring).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracelearn.schemas.dataset import dataset_files

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules; spawned client processes re-import them
    sys.path.insert(0, str(HERE))

from collector_clients import ClientReport, run_clients  # noqa: E402
from collector_servers import (  # noqa: E402
    DEFAULT_AGL,
    Target,
    agl_statistics,
    sidecar_status,
    start_agl_store,
    start_sidecar,
    start_target,
    wait_for_conversion,
)
from collector_workload import BodyMaker, Workload, build_workload  # noqa: E402

# --- Verification against the Parquet dataset ------------------------------------------------------------


@dataclass(frozen=True)
class DatasetCheck:
    """Acknowledged spans against the rows of the Parquet dataset."""

    acknowledged: int
    rows: int
    missing: int  # acknowledged, not in the dataset
    duplicated: int  # acknowledged spans present more than once (extra rows)
    unacknowledged_rows: int  # rows of spans never acknowledged (e.g. in flight at a kill)
    files: int

    @property
    def exact(self) -> bool:
        return self.missing == 0 and self.duplicated == 0


def dataset_key_counts(spans_root: Path) -> tuple[Counter[str], int]:
    """``trace_id + span_id`` of every row of the spans dataset under ``spans_root``, with multiplicity."""
    counts: Counter[str] = Counter()
    files = dataset_files(spans_root) if spans_root.exists() else []
    for path in files:
        table = pq.read_table(path, columns=["trace_id", "span_id"])
        keys = pc.binary_join_element_wise(table["trace_id"], table["span_id"], pa.scalar(""))
        counts.update(keys.to_pylist())
    return counts, len(files)


def check_dataset(spans_root: Path, maker: BodyMaker, acked_bodies: Sequence[int]) -> DatasetCheck:
    counts, files = dataset_key_counts(spans_root)
    acknowledged = [key for body in acked_bodies for key in maker.keys(body)]
    wanted = set(acknowledged)
    missing = sum(1 for key in wanted if key not in counts)
    duplicated = sum(counts[key] - 1 for key in wanted if counts.get(key, 0) > 1)
    duplicated += len(acknowledged) - len(wanted)  # a body acknowledged twice would show here
    unacknowledged = sum(n for key, n in counts.items() if key not in wanted)
    return DatasetCheck(len(acknowledged), sum(counts.values()), missing, duplicated, unacknowledged, files)


# --- Part 1 and 2: ingest throughput, and side by side with agl store -----------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class IngestResult:
    """One ingest run against one target."""

    target: Target
    clients: int
    spans_sent: int
    spans_acked: int
    bodies_acked: int
    wall_s: float
    server_cpu_s: float  # CPU of the server from the first request to the last answer
    # The sidecar: ... until every acknowledged span is in Parquet (its conversion runs behind the answers)
    server_cpu_in_parquet_s: float | None
    server_cpu_through_exit_s: float | None  # ... to its exit
    p50_ms: float
    p99_ms: float
    bytes_per_span: float
    write_bytes: int  # bytes the server process wrote to storage (/proc/PID/io) during the run
    durable: bool  # acknowledged only once on disk
    stored_spans: int  # rows in the dataset (ours) / total_spans in the store (agl)
    check: DatasetCheck | None
    report: ClientReport
    workload: Workload = field(repr=False)  # as sent (for agl: naming the rollouts created in that store)
    notes: list[str] = field(default_factory=list)

    @property
    def spans_per_cpu_s(self) -> float:
        return self.spans_acked / self.server_cpu_s if self.server_cpu_s > 0 else math.nan

    @property
    def spans_per_cpu_s_in_parquet(self) -> float | None:
        cpu = self.server_cpu_in_parquet_s
        return self.spans_acked / cpu if cpu else None

    @property
    def spans_per_cpu_s_through_exit(self) -> float | None:
        cpu = self.server_cpu_through_exit_s
        return self.spans_acked / cpu if cpu else None

    @property
    def spans_per_wall_s(self) -> float:
        return self.spans_acked / self.wall_s


def measure_ingest(
    target: Target,
    workload: Workload,
    clients: int = 4,
    workdir: Path | None = None,
    agl: Path = DEFAULT_AGL,
    keep: bool = False,
) -> IngestResult:
    """Post every body of ``workload`` to a fresh ``target`` over ``clients`` connections (one process each).

    For the sidecar: CPU to the last answer and through its SIGTERM exit, then every acknowledged span
    is looked up in the Parquet dataset. For agl: the store's span count after the run.
    """
    with _workdir(workdir, keep) as directory:
        server, workload = start_target(target, directory / target, workload, agl=agl)
        writes_before = server.write_bytes()
        cpu_in_parquet = None
        try:
            run = run_clients(server, workload, clients, bodies=range(workload.bodies))
            writes = server.write_bytes() - writes_before
            notes: list[str] = []
            if target == "agl":
                stats = agl_statistics(server)
                stored, durable = int(stats["total_spans"]), False
                notes.append(f"agl {stats['name']}: total_spans {stats['total_spans']}, "
                             f"{stats.get('total_span_bytes', 0) / 2**20:.0f} MiB of spans in memory")
            else:
                in_parquet = wait_for_conversion(server)
                status = sidecar_status(server)
                notes.append(f"sidecar /status: accepted {status['spans_accepted']}, duplicate "
                             f"{status['spans_duplicate']}, rejected {status['spans_rejected']}, "
                             f"commits {status['commits']}, files written {status['files_rolled']}, "
                             f"quarantined {status['spans_quarantined']}")
                if in_parquet is not None:
                    cpu_in_parquet = in_parquet[0] - run.server_cpu_at_go
                    notes.append(f"all acknowledged spans in Parquet {in_parquet[1]:.1f} s after the last answer")
                durable = True
        finally:
            ended = server.stop(signal.SIGTERM)
        check = None
        through_exit = None
        if target == "tracelearn":
            through_exit = ended.cpu_s - run.server_cpu_at_go
            check = check_dataset(directory / target / "data" / "spans", BodyMaker(workload), run.report.acked)
            stored = check.rows
            if ended.returncode != 0:
                notes.append(f"the sidecar exited {ended.returncode}: {ended.log_tail}")
        acked_spans = sum(workload.spans_in(b) for b in run.report.acked)
        latencies = run.report.accepted_latency_s
        return IngestResult(
            target=target,
            clients=clients,
            spans_sent=workload.spans,
            spans_acked=acked_spans,
            bodies_acked=len(run.report.acked),
            wall_s=run.wall_s,
            server_cpu_s=run.server_cpu_s,
            server_cpu_in_parquet_s=cpu_in_parquet,
            server_cpu_through_exit_s=through_exit,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            bytes_per_span=workload.bytes_per_span,
            write_bytes=writes,
            durable=durable,
            stored_spans=stored,
            check=check,
            report=run.report,
            workload=workload,
            notes=notes,
        )


@contextlib.contextmanager
def _workdir(workdir: Path | None, keep: bool) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    directory = Path(tempfile.mkdtemp(prefix="tracelearn-collector-bench-"))
    try:
        yield directory
    finally:
        if keep:
            print(f"  (kept {directory})")
        else:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class ComparisonResult:
    """The same workload against both targets."""

    ours: IngestResult
    agl: IngestResult

    @property
    def ratio(self) -> float:
        """Ours over agl, spans per wall second (the same client, the same concurrency)."""
        return self.ours.spans_per_wall_s / self.agl.spans_per_wall_s

    @property
    def cpu_ratio(self) -> float:
        """Ours (all the way into Parquet) over agl (spans held in memory), spans per server CPU-second."""
        ours = self.ours.spans_per_cpu_s_in_parquet or self.ours.spans_per_cpu_s
        return ours / self.agl.spans_per_cpu_s


def compare_with_agl(
    spans: int = 150_000,
    clients: int = 4,
    batch_size: int = 512,
    workdir: Path | None = None,
    agl: Path = DEFAULT_AGL,
    workload: Workload | None = None,
) -> ComparisonResult:
    """agl store then the sidecar, the same bodies (naming rollouts that exist in that agl store)."""
    workload = workload or build_workload(spans, batch_size)
    agl_result = measure_ingest("agl", workload, clients, workdir / "agl-run" if workdir else None, agl)
    # Byte for byte the bodies agl got (the agl attributes name its rollouts; ours ignores them).
    ours = measure_ingest("tracelearn", agl_result.workload, clients, workdir / "ours-run" if workdir else None)
    return ComparisonResult(ours, agl_result)


# --- Part 3: load test with backpressure ------------------------------------------------------------------


@dataclass
class LoadResult:
    """Many clients for a bounded time against a sidecar with a small write queue."""

    connections: int
    duration_s: float
    queue_bytes: int
    report: ClientReport
    wall_s: float
    server_cpu_s: float
    check: DatasetCheck
    spans_acked: int

    @property
    def accepted_requests(self) -> int:
        return self.report.statuses["200"]

    @property
    def rejected_with_retry(self) -> int:
        return self.report.rejected_attempts


def load_test(
    connections: int = 64,
    duration_s: float = 30.0,
    queue_bytes: int = 8 * 2**20,
    processes: int = 4,
    batch_size: int = 512,
    workdir: Path | None = None,
    workload: Workload | None = None,
) -> LoadResult:
    """``connections`` clients send new bodies for ``duration_s``; rejected ones wait ``Retry-After`` and resend.

    A body still refused at the deadline is abandoned (not acknowledged, so not counted). Then the
    sidecar is stopped (SIGTERM) and every acknowledged span is looked up in the dataset.
    """
    workload = workload or build_workload(batch_size, batch_size)
    with _workdir(workdir, False) as directory:
        server = start_sidecar(directory / "data", directory / "sidecar.log", queue_bytes)
        try:
            run = run_clients(server, workload, connections, processes, duration_s=duration_s)
        finally:
            server.stop(signal.SIGTERM)
        check = check_dataset(directory / "data" / "spans", BodyMaker(workload), run.report.acked)
    return LoadResult(
        connections, duration_s, queue_bytes, run.report, run.wall_s, run.server_cpu_s, check,
        sum(workload.spans_in(b) for b in run.report.acked),
    )


# --- Part 4: durability after a kill -9 -----------------------------------------------------------------------


@dataclass
class CrashResult:
    """Acknowledged spans before a SIGKILL, and what a restart finds of them."""

    target: Target
    spans_acked_before_kill: int
    bodies_unanswered_at_kill: int
    spans_resent_after_restart: int
    spans_missing: int  # acknowledged before the kill, absent after the restart
    spans_duplicated: int  # extra copies of any span in the end
    restart_s: float  # from the restart to ready
    final_rows: int
    notes: list[str] = field(default_factory=list)

    @property
    def lost_share(self) -> float:
        return self.spans_missing / self.spans_acked_before_kill if self.spans_acked_before_kill else math.nan


def crash_durability(
    target: Target,
    spans: int = 60_000,
    clients: int = 4,
    kill_at: float = 0.5,
    batch_size: int = 512,
    workdir: Path | None = None,
    agl: Path = DEFAULT_AGL,
    workload: Workload | None = None,
) -> CrashResult:
    """Ingest, SIGKILL ``target`` once ``kill_at`` of the spans are acknowledged, restart on the same data.

    Sidecar: the bodies not acknowledged before the kill (those in flight included, some of which may
    already be durable) are resent to the restarted sidecar, which is then stopped with SIGTERM; the
    dataset must hold every span exactly once. agl store: after the restart its span count is read
    (it holds spans in memory only; its rollouts are gone too, so nothing can be resent).
    """
    workload = (workload or build_workload(spans, batch_size)).with_bodies(math.ceil(spans / batch_size))
    threshold = int(workload.spans * kill_at)
    with _workdir(workdir, False) as directory:
        server, workload = start_target(target, directory / target, workload, agl=agl)
        maker = BodyMaker(workload)
        try:
            first = run_clients(server, workload, clients, bodies=range(workload.bodies),
                                stop_on_connection_error=True, kill_after_spans=threshold)
        finally:
            server.stop(signal.SIGKILL)
        acked_before = sum(workload.spans_in(b) for b in first.report.acked)
        unanswered = len(first.report.unanswered)
        notes = [f"killed with {first.killed_at_spans} spans acknowledged (threshold {threshold}); "
                 f"{unanswered} bodies in flight"]
        started = time.monotonic()
        if target == "agl":
            restarted = start_agl_store(directory / target / "agl-restart.log", agl)
            restart_s = time.monotonic() - started
            try:
                stats = agl_statistics(restarted)
            finally:
                restarted.stop(signal.SIGTERM)
            present = int(stats["total_spans"])
            notes.append(f"after the restart: {stats['total_rollouts']} rollouts, {present} spans in the store")
            return CrashResult(target, acked_before, unanswered, 0, max(acked_before - present, 0), 0,
                               restart_s, present, notes)
        data = directory / target / "data"
        restarted = start_sidecar(data, directory / target / "sidecar-restart.log")
        restart_s = time.monotonic() - started
        replay = re.search(r"start-up replay done in ([\d.]+) s \((\d+) keys", restarted.log.read_text())
        if replay:
            notes.append(f"restart replayed the spool in {replay.group(1)} s ({replay.group(2)} keys seeded)")
        acked = set(first.report.acked)
        rest = [b for b in range(workload.bodies) if b not in acked]
        try:
            second = run_clients(restarted, workload, clients, bodies=rest)
        finally:
            ended = restarted.stop(signal.SIGTERM)
        if ended.returncode != 0:
            notes.append(f"the restarted sidecar exited {ended.returncode}: {ended.log_tail}")
        if len(second.report.acked) != len(rest):
            notes.append(f"after the restart {len(rest) - len(second.report.acked)} resent bodies were not "
                         f"acknowledged: {second.report.error_samples}")
        before = check_dataset(data / "spans", maker, first.report.acked)
        every = check_dataset(data / "spans", maker, first.report.acked + second.report.acked)
        return CrashResult(
            target, acked_before, unanswered, sum(workload.spans_in(b) for b in rest), before.missing,
            every.duplicated, restart_s, every.rows, notes,
        )

