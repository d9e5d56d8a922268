"""The OTLP receiver's ingest core: request bodies in, spans durable on disk exactly once, then Parquet.

Owns what both fronts (``otlp_http``, ``otlp_grpc``) share and nothing about either protocol:

- **Admission.** Requests are refused (``UnavailableError``: 503 / UNAVAILABLE) while the spool of
  dead writers is being replayed at start, while the disk refuses writes, and while draining for
  shutdown; and (``QueueFullError``: 429 / RESOURCE_EXHAUSTED) when the write queue is at its bound. The
  queue is bounded in bytes: a request holds its body's bytes (as read, and as inflated) from the
  first byte the front reads until its commit completes, so bodies being read on many connections
  count too. Both refusals carry the seconds after which a retry makes sense.
- **Group commit.** Handler threads decode their body (``otlp_decode``) and build Arrow rows
  (``SpanColumns``, the in-process exporter's normalization) once per request, then queue them; one
  committer thread appends every queued request's rows to the write-ahead spool with one write and
  one fsync (``PartitionedParquetWriter.spool_and_add``, the writer the in-process exporter uses) and
  wakes each waiting request. A request is acknowledged only after the commit holding its rows.
- **De-duplication.** The committer drops rows whose (trace_id, span_id) it committed recently (a
  client retrying a request whose answer it never got), so a retry inside the window is
  acknowledged without being written twice. The window holds at most ``dedup_window`` keys (about
  90 bytes each) and is seeded at start with the keys of the spool it replayed: a retry of a request
  that a ``kill -9`` cut off after its fsync is recognized too. Beyond the window the spool replay
  (within a segment) and the pipeline (on read) de-duplicate.
- **Rolling and replay.** A maintenance thread rolls the buffered rows into atomic Parquet files by
  size or age (``TRACELEARN_ROLL_BYTES`` / ``TRACELEARN_ROLL_SECONDS``), replays exited writers' spools
  once per roll period, and, while the disk refuses writes, probes it until it takes writes again.
  ``close()`` rolls what is left.
- **Feedback** items (``/v1/feedback``) validated and written by ``collector.feedback``, durable
  before they are acknowledged.
- The counters behind ``/metrics`` (Prometheus text) and ``/status`` (JSON), and the bearer token
  check both fronts apply.

An acknowledged span is on disk exactly once: in the spool at acknowledgement, in one Parquet file
after the roll (or, after a crash, after the next start's replay).

May import: tracelearn.collector, tracelearn.schemas, pyarrow, orjson. Never grpc, http.server,
polars, torch or airflow.
"""

import contextlib
import enum
import hmac
import logging
import math
import os
import shutil
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.collector.atomic_files import Partition
from tracelearn.collector.feedback import FeedbackError, FeedbackItem, append_feedback, feedback_item
from tracelearn.collector.otlp_decode import DEFAULT_LIMITS, DecodeLimits, decode_request
from tracelearn.collector.parquet_writer import PartitionedParquetWriter, WriteError
from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_rows import SpanColumns
from tracelearn.collector.spool import SEGMENT_PREFIX, SEGMENT_SUFFIX, replay_spools
from tracelearn.schemas.dataset import dataset_files
from tracelearn.schemas.tables import SPANS

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 16 * MIB
DEFAULT_QUEUE_BYTES = 64 * MIB
DEFAULT_DEDUP_WINDOW = 500_000
# Seconds a client is told to wait: the queue drains within a commit or two; a full disk takes longer.
RETRY_AFTER_QUEUE_FULL = 1.0
RETRY_AFTER_UNAVAILABLE = 5.0
RETRY_AFTER_STARTING = 2.0
# How long a request waits for its commit before it is answered 503 (a stuck disk); the commit may
# still land, and the client's retry is then a duplicate the window drops.
COMMIT_TIMEOUT_SECONDS = 30.0
MAINTENANCE_SECONDS = 1.0
# While the disk refuses writes and no rows wait for a roll, a file this big written, fsynced and
# deleted is the test that it takes writes again.
PROBE_BYTES = 1 * MIB
# At most one log line per kind of refusal or rejection in this many seconds.
WARNING_INTERVAL_SECONDS = 10.0
COMMIT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RetryLaterError(Exception):
    """The receiver cannot take this request now; a retry after ``retry_after`` seconds may succeed."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(RetryLaterError):
    """The write queue is at its byte bound (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class UnavailableError(RetryLaterError):
    """Starting, draining, or the disk refuses writes (HTTP 503, gRPC UNAVAILABLE)."""


class InvalidFeedbackError(ValueError):
    """A feedback request has invalid items (HTTP 400); ``errors`` name each item's index and field."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__(f"{len(errors)} feedback item(s) are invalid and nothing was written: " + "; ".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class ReceiverConfig:
    """Where spans land and the receiver's bounds."""

    data_root: Path
    roll_bytes: int = 64 * MIB
    roll_seconds: float = 60.0
    compression: str = "zstd"
    max_attribute_bytes: int = 8 * MIB
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    dedup_window: int = DEFAULT_DEDUP_WINDOW
    limits: DecodeLimits = DEFAULT_LIMITS
    commit_timeout_s: float = COMMIT_TIMEOUT_SECONDS

    @classmethod
    def from_settings(cls, settings: CaptureSettings, **overrides: Any) -> "ReceiverConfig":
        """The capture settings (``TRACELEARN_*``), with bounds from the command line."""
        config = cls(
            data_root=settings.data_root,
            roll_bytes=settings.roll_bytes,
            roll_seconds=settings.roll_seconds,
            compression=settings.compression,
            max_attribute_bytes=settings.max_attribute_bytes,
        )
        return replace(config, **overrides)

    @property
    def spans_root(self) -> Path:
        return self.data_root / SPANS.name


@dataclass(frozen=True)
class ExportOutcome:
    """What became of one export request's spans; ``error_message`` feeds OTLP ``partial_success``."""

    accepted: int
    duplicates: int
    rejected: int
    error_message: str


def bearer_token_matches(expected: bytes | None, authorization: str | None) -> bool:
    """Whether an ``Authorization`` value carries the expected bearer token (always, when none is set).

    Compared in constant time, so the answer's timing does not reveal how much of a guess was right.
    """
    if expected is None:
        return True
    if authorization is None:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode("utf-8", "surrogateescape"), expected)


def read_token_file(path: Path) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace removed); raises ``ValueError`` if empty."""
    token = path.read_bytes().strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


# --- Counters ----------------------------------------------------------------------------------------


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); observed under its owner's lock."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            label = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{le="{label}"}} {cumulative}')
        out.append(f"{name}_sum {self.total}")
        out.append(f"{name}_count {cumulative}")
        return out


@dataclass
class ReceiverCounters:
    """Everything ``/metrics`` and ``/status`` count since start; changed under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    spans_accepted: int = 0  # acknowledged: durable in the spool (duplicates included)
    spans_spooled: int = 0  # new rows appended to the spool
    spans_duplicate: int = 0
    spans_rejected: dict[str, int] = field(default_factory=dict)  # by reason
    spans_replayed: int = 0
    attribute_values_truncated: int = 0
    span_items_dropped: int = 0  # attributes, events, links beyond the count limits
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (front, path, code)
    commits: int = 0
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_SECONDS_BUCKETS))
    write_failures: int = 0
    files_rolled: int = 0
    feedback_accepted: int = 0
    feedback_rejected: int = 0

    def rejected(self, reason: str, spans: int) -> None:
        if spans:
            with self.lock:
                self.spans_rejected[reason] = self.spans_rejected.get(reason, 0) + spans


class ThrottledWarnings:
    """Log lines about refused requests and rejected spans: per kind, at most one every ``interval`` s.

    A client that sends something bad sends it again on every retry; one line per kind and interval,
    with the number of lines held back, says what happens without flooding the log.
    """

    def __init__(self, interval: float = WARNING_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (when logged, held back since)

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            logged, held_back = self._last.get(kind, (-math.inf, 0))
            if now - logged < self.interval:
                self._last[kind] = (logged, held_back + 1)
                return
            self._last[kind] = (now, 0)
        more = f" ({held_back} more like it in the last {self.interval:.0f} s)" if held_back else ""
        logger.warning("tracelearn collector: %s%s", message, more)


# --- De-duplication window -----------------------------------------------------------------------------


def span_key(trace_id: int, span_id: int) -> int:
    """(trace_id, span_id) as one int: exact (no hashing), so no two spans ever share a key."""
    return (trace_id << 64) | span_id


class RecentSpanKeys:
    """The keys of the last ``capacity`` (at least; at most twice that) committed spans.

    Two generations of sets: when the current one holds ``capacity // 2`` keys it becomes the old one
    and the previous old one is dropped, so eviction is one step and no per-key queue is kept.
    Used by the committer thread only.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._generation_size = max(capacity // 2, 1)
        self._current: set[int] = set()
        self._previous: set[int] = set()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def __contains__(self, key: int) -> bool:
        return key in self._current or key in self._previous

    def isdisjoint(self, keys: Iterable[int]) -> bool:
        return self._current.isdisjoint(keys) and self._previous.isdisjoint(keys)

    def add_all(self, keys: Iterable[int]) -> None:
        if self.capacity <= 0:
            return
        self._current.update(keys)
        if len(self._current) >= self._generation_size:
            self._previous, self._current = self._current, set()


def new_rows(keys: Sequence[int], recent: RecentSpanKeys, earlier: set[int]) -> list[int] | None:
    """Positions of ``keys`` neither recent, in ``earlier`` (this group), nor repeated; ``None``: all of them.

    Adds the kept keys to ``earlier``. The common case, nothing seen before, costs three C-level set
    operations and no Python loop.
    """
    if recent.isdisjoint(keys) and earlier.isdisjoint(keys):
        before = len(earlier)
        earlier.update(keys)
        if len(earlier) - before == len(keys):
            return None
        for key in keys:  # repeated within the request itself: undo and take the slow path
            earlier.discard(key)
    kept = []
    for position, key in enumerate(keys):
        if key not in recent and key not in earlier:
            earlier.add(key)
            kept.append(position)
    return kept


# --- Write queue and group commit ----------------------------------------------------------------------


class WriteQueue:
    """Bytes held by requests, from reading their body to the end of their commit, against a bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        return self._bytes

    def full(self) -> bool:
        return self._bytes >= self.limit

    @contextlib.contextmanager
    def reserved(self, nbytes: int = 0) -> Iterator["Reservation"]:
        """A reservation holding ``nbytes`` (grown as a body is read), released at the end."""
        reservation = Reservation(self)
        try:
            reservation.grow(nbytes)
            yield reservation
        finally:
            with self._lock:
                self._bytes -= reservation.nbytes
            reservation.nbytes = 0

    def _grow(self, reservation: "Reservation", nbytes: int) -> None:
        with self._lock:
            # A request is refused only while others hold bytes: one larger than the whole bound is
            # let in alone, so it is never refused forever (the fronts' body limit keeps it finite).
            if self._bytes - reservation.nbytes and self._bytes + nbytes > self.limit:
                raise QueueFullError(
                    f"the write queue holds {self._bytes} of {self.limit} bytes; retry later",
                    RETRY_AFTER_QUEUE_FULL,
                )
            self._bytes += nbytes
            reservation.nbytes += nbytes


class Reservation:
    """One request's bytes in the ``WriteQueue``."""

    def __init__(self, queue: WriteQueue) -> None:
        self._queue = queue
        self.nbytes = 0

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more; raises ``QueueFullError`` when they do not fit."""
        if nbytes > 0:
            self._queue._grow(self, nbytes)

    def grow_to(self, nbytes: int) -> None:
        """Hold at least ``nbytes`` in all."""
        self.grow(nbytes - self.nbytes)


@dataclass(slots=True)
class _Commit:
    """One request's rows waiting for the committer, and what became of them."""

    batches: list[tuple[Partition, pa.RecordBatch, list[int]]]
    done: threading.Event = field(default_factory=threading.Event)
    written: int = 0
    duplicates: int = 0
    error: str | None = None


class GroupCommitter:
    """One thread that appends every waiting request's rows to the spool in one write and fsync.

    ``commit`` blocks until the commit holding the caller's rows is durable (or failed). Rows already
    committed recently (by key) are dropped and counted as duplicates, not written.
    """

    def __init__(
        self,
        writer: PartitionedParquetWriter,
        recent: RecentSpanKeys,
        counters: ReceiverCounters,
        on_write_error: "WriteHealth",
    ) -> None:
        self._writer = writer
        self._recent = recent
        self._counters = counters
        self._health = on_write_error
        self._queue: list[_Commit] = []
        self._wakeup = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tracelearn-commit", daemon=True)
        self._thread.start()

    def commit(self, batches: list[tuple[Partition, pa.RecordBatch, list[int]]], timeout: float) -> _Commit:
        """Queue the rows (each batch with its rows' span keys) and wait for their commit."""
        pending = _Commit(batches)
        with self._wakeup:
            if self._stopping:
                raise UnavailableError("the collector is shutting down", RETRY_AFTER_STARTING)
            self._queue.append(pending)
            self._wakeup.notify()
        if not pending.done.wait(timeout):
            raise UnavailableError(
                f"the spool append did not finish within {timeout:.0f} s (a stalled disk?)", RETRY_AFTER_UNAVAILABLE
            )
        if pending.error is not None:
            raise UnavailableError(pending.error, RETRY_AFTER_UNAVAILABLE)
        return pending

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue, []
            try:
                self._write_group(group)
            except Exception as exc:  # a bug, not the disk: fail these requests, keep serving
                logger.exception("tracelearn collector: a group commit of %d requests failed", len(group))
                for pending in group:
                    pending.error = f"internal error while writing: {exc}"
                    pending.done.set()

    def _write_group(self, group: list[_Commit]) -> None:
        earlier: set[int] = set()
        rows: list[tuple[Partition, pa.RecordBatch]] = []
        new_keys: list[list[int]] = []
        for pending in group:
            for partition, batch, keys in pending.batches:
                kept = new_rows(keys, self._recent, earlier)
                if kept is None:
                    rows.append((partition, batch))
                    new_keys.append(keys)
                    pending.written += len(keys)
                    continue
                pending.duplicates += len(keys) - len(kept)
                if kept:
                    rows.append((partition, batch.take(pa.array(kept, pa.int32()))))
                    new_keys.append([keys[position] for position in kept])
                    pending.written += len(kept)
        started = time.perf_counter()
        try:
            self._writer.spool_and_add(rows)
        except WriteError as exc:
            self._health.failed(exc)
            with self._counters.lock:
                self._counters.write_failures += 1
            for pending in group:
                pending.error = f"the disk refuses writes: {exc}"
                pending.done.set()
            return
        elapsed = time.perf_counter() - started
        for keys in new_keys:
            self._recent.add_all(keys)
        counters = self._counters
        with counters.lock:
            counters.commits += 1
            counters.commit_seconds.observe(elapsed)
            for pending in group:
                counters.spans_spooled += pending.written
                counters.spans_duplicate += pending.duplicates
                counters.spans_accepted += pending.written + pending.duplicates
        for pending in group:
            pending.done.set()


# --- Disk health -------------------------------------------------------------------------------------------


class WriteHealth:
    """Whether the disk takes writes; after a failure every request is refused until a probe succeeds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """Why writes are refused, or ``None`` while the disk takes them."""
        return self._problem

    def failed(self, error: OSError) -> None:
        with self._lock:
            first = self._problem is None
            self._problem = str(error)
        if first:  # once per outage, not once per request
            logger.error(
                "tracelearn collector: refusing spans (503, Retry-After %.0f s) because %s; what is acknowledged "
                "is on disk, probing every %.0f s",
                RETRY_AFTER_UNAVAILABLE,
                error,
                MAINTENANCE_SECONDS,
            )

    def recovered(self) -> None:
        with self._lock:
            was, self._problem = self._problem, None
        if was is not None:
            logger.warning("tracelearn collector: writes work again; accepting spans")


def probe_disk(directory: Path, nbytes: int = PROBE_BYTES) -> None:
    """Write, fsync and delete a file of ``nbytes`` in ``directory``; raises ``OSError`` if the disk refuses."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(bytes(nbytes))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


# --- The receiver --------------------------------------------------------------------------------------------


class Phase(enum.Enum):
    STARTING = "replaying the spool left by exited writers"
    READY = "ready"
    DRAINING = "shutting down"
    CLOSED = "closed"


@dataclass(frozen=True)
class ShutdownReport:
    """What ``close()`` did: rows rolled into Parquet at shutdown and rows left in the spool for replay."""

    rows_flushed: int
    files: int
    rows_left_in_spool: int


class OtlpReceiver:
    """The ingest core shared by the HTTP and gRPC fronts (see the module docstring).

    ``start()`` replays in the background (``ready`` is false meanwhile); ``export_traces`` and
    ``export_feedback`` run on the fronts' handler threads; ``drain()`` then ``close()`` shut down.
    """

    def __init__(self, config: ReceiverConfig, token: bytes | None = None) -> None:
        self.config = config
        self.token = token
        self.counters = ReceiverCounters()
        self.warnings = ThrottledWarnings()
        self.health = WriteHealth()
        self.queue = WriteQueue(config.queue_bytes)
        self.recent = RecentSpanKeys(config.dedup_window)
        self.writer = PartitionedParquetWriter(
            config.spans_root,
            SPANS,
            roll_bytes=config.roll_bytes,
            roll_seconds=config.roll_seconds,
            compression=config.compression,
        )
        self._committer = GroupCommitter(self.writer, self.recent, self.counters, self.health)
        self._phase = Phase.STARTING
        self._phase_changed = threading.Condition()
        self._in_flight = 0
        self._local = threading.local()
        self._stopping = threading.Event()
        self._started_at = time.time()
        self._maintenance: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> None:
        """Replay exited writers' spools and seed the de-duplication window, in the background."""
        self._maintenance = threading.Thread(target=self._maintain, name="tracelearn-maintenance", daemon=True)
        self._maintenance.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the start-up replay is done; returns whether the receiver is ready."""
        with self._phase_changed:
            self._phase_changed.wait_for(lambda: self._phase is not Phase.STARTING, timeout)
        return self.ready[0]

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether requests are accepted now, and why not."""
        if self._phase is not Phase.READY:
            return False, self._phase.value
        problem = self.health.problem
        if problem is not None:
            return False, f"the disk refuses writes: {problem}"
        return True, Phase.READY.value

    def drain(self, timeout: float = 30.0) -> None:
        """Refuse new requests (503) and wait up to ``timeout`` for those in flight to be answered."""
        with self._phase_changed:
            if self._phase in (Phase.STARTING, Phase.READY):
                self._set_phase(Phase.DRAINING)
            self._phase_changed.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> ShutdownReport:
        """Commit what is queued, roll every buffered row into Parquet, close the spool."""
        self.drain()
        self._committer.stop()
        self._stopping.set()
        if self._maintenance is not None:
            self._maintenance.join()
        buffered = self.writer.buffered_rows
        files: list[Path] = []
        try:
            files = self.writer.flush()
        except WriteError as exc:
            logger.error("tracelearn collector: %s", exc)
        left = self.writer.buffered_rows
        self.writer.close()
        with self._phase_changed:
            self._set_phase(Phase.CLOSED)
        with self.counters.lock:
            self.counters.files_rolled += len(files)
        report = ShutdownReport(rows_flushed=buffered - left, files=len(files), rows_left_in_spool=left)
        logger.info(
            "tracelearn collector: shutdown flushed %d spans into %d files under %s",
            report.rows_flushed,
            report.files,
            self.config.spans_root,
        )
        if left:
            logger.warning(
                "tracelearn collector: %d acknowledged spans could not be rolled into Parquet; they are in the "
                "spool under %s and land in Parquet when the collector starts again",
                left,
                self.writer.spool_directory,
            )
        return report

    def _set_phase(self, phase: Phase) -> None:
        self._phase = phase
        self._phase_changed.notify_all()

    # --- requests

    def check_accepting(self, spans: bool = True) -> None:
        """Raise the refusal a request would get now (before its body is read or decoded).

        ``spans``: also refuse when the write queue is full (feedback does not go through it).
        """
        if self._phase is not Phase.READY:
            retry = RETRY_AFTER_STARTING if self._phase is Phase.STARTING else RETRY_AFTER_UNAVAILABLE
            raise UnavailableError(f"the collector is {self._phase.value}", retry)
        problem = self.health.problem
        if problem is not None:
            raise UnavailableError(f"the disk refuses writes: {problem}", RETRY_AFTER_UNAVAILABLE)
        if spans and self.queue.full():
            raise QueueFullError(
                f"the write queue is at its bound of {self.queue.limit} bytes; retry later", RETRY_AFTER_QUEUE_FULL
            )

    @contextlib.contextmanager
    def _request(self, spans: bool = True) -> Iterator[None]:
        """A request in flight: admitted now, and waited for by ``drain``."""
        with self._phase_changed:
            self.check_accepting(spans)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._phase_changed:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._phase_changed.notify_all()

    def _columns(self) -> SpanColumns:
        # One builder per handler thread, reused: its caches live on, and a truncation is logged once
        # per thread rather than once per request.
        columns: SpanColumns | None = getattr(self._local, "columns", None)
        if columns is None:
            columns = self._local.columns = SpanColumns(self.config.max_attribute_bytes)
        return columns

    def reserve(self) -> contextlib.AbstractContextManager[Reservation]:
        """Queue bytes for a request whose body is still being read: the front grows it as it reads."""
        return self.queue.reserved()

    def export_traces(self, body: bytes, content_type: str, reservation: Reservation | None = None) -> ExportOutcome:
        """Decode an ``ExportTraceServiceRequest`` body, commit its spans durably, say what was kept.

        The body's bytes count in the write queue until the commit ends: in ``reservation`` (from
        ``reserve``, held by the caller since it began reading the body) or in a reservation of its own.
        Raises ``OtlpDecodeError`` (malformed body), ``QueueFullError`` or ``UnavailableError``.
        """
        # A caller's reservation was admitted by the queue already (and may be all that fills it).
        with self._request(spans=reservation is None), contextlib.ExitStack() as held:
            if reservation is None:
                reservation = held.enter_context(self.queue.reserved())
            reservation.grow_to(len(body))
            decoded = decode_request(body, content_type, self.config.limits)
            counters = self.counters
            counters.rejected("invalid", decoded.rejected_spans)
            columns = self._columns()
            truncated_before = columns.truncated_values
            keys: dict[Partition, list[int]] = {}
            try:
                add = columns.add
                for record in decoded.records:
                    partition = add(record)
                    partition_keys = keys.get(partition)
                    if partition_keys is None:
                        partition_keys = keys[partition] = []
                    partition_keys.append((record.trace_id << 64) | record.span_id)
            finally:
                batches = columns.take()  # also when a span failed to convert: the builder starts clean
            truncated = columns.truncated_values - truncated_before
            with counters.lock:
                counters.attribute_values_truncated += truncated
                counters.span_items_dropped += decoded.dropped_items
            message = decoded.error_message
            if truncated:
                note = f"truncated {truncated} attribute value(s) longer than {self.config.max_attribute_bytes} bytes"
                message = f"{message}; {note}" if message else note
            if message:
                total = len(decoded.records) + decoded.rejected_spans
                self.warnings.warn("partial", f"kept {len(decoded.records)} of {total} spans of a request: {message}")
            if not decoded.records:
                return ExportOutcome(0, 0, decoded.rejected_spans, message)
            try:
                committed = self._committer.commit(
                    [(partition, batch, keys[partition]) for partition, batch in batches.items()],
                    self.config.commit_timeout_s,
                )
            except UnavailableError:
                counters.rejected("unavailable", len(decoded.records))
                raise
        return ExportOutcome(committed.written, committed.duplicates, decoded.rejected_spans, message)

    def export_feedback(self, body: bytes) -> int:
        """Validate a JSON feedback object or list of objects and write it durably; returns the items.

        Raises ``InvalidFeedbackError`` (nothing is written when any item is invalid) or ``UnavailableError``.
        """
        with self._request(spans=False):
            items = self._feedback_items(body)
            try:
                append_feedback(self.config.data_root, items)
            except OSError as exc:
                self.health.failed(exc)
                raise UnavailableError(f"the disk refuses writes: {exc}", RETRY_AFTER_UNAVAILABLE) from exc
            with self.counters.lock:
                self.counters.feedback_accepted += len(items)
            return len(items)

    def _feedback_items(self, body: bytes) -> list[FeedbackItem]:
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidFeedbackError([f"the body is not JSON: {exc}"]) from None
        raws = raw if isinstance(raw, list) else [raw]
        if not raws:
            raise InvalidFeedbackError(["the body is an empty list; send an object or a list of objects"])
        items: list[FeedbackItem] = []
        errors: list[str] = []
        for index, item in enumerate(raws):
            where = f"item {index}"
            if not isinstance(item, dict):
                errors.append(f"{where}: must be a JSON object, not {type(item).__name__}")
                continue
            try:
                items.append(feedback_item(item, where))
            except FeedbackError as exc:
                errors.append(str(exc))
        if errors:
            with self.counters.lock:
                self.counters.feedback_rejected += len(raws)
            raise InvalidFeedbackError(errors)
        return items

    def count_request(self, front: str, path: str, code: str) -> None:
        """Count one answered request for ``/metrics`` (the fronts call this for every answer)."""
        key = (front, path, code)
        with self.counters.lock:
            self.counters.requests[key] = self.counters.requests.get(key, 0) + 1

    # --- background work

    def _maintain(self) -> None:
        self._replay_at_start()
        next_replay = time.monotonic() + self.config.roll_seconds
        while not self._stopping.wait(MAINTENANCE_SECONDS):
            try:
                if self.health.problem is not None:
                    self._probe()
                else:
                    self._roll(self.writer.roll_due)
                if time.monotonic() >= next_replay:
                    self._replay()
                    next_replay = time.monotonic() + self.config.roll_seconds
            except Exception:  # a bug: keep the thread (rolls, probes) alive, say it once per occurrence
                logger.exception("tracelearn collector: background roll or replay failed; retrying")

    def _replay_at_start(self) -> None:
        started = time.monotonic()
        try:
            files = self._replay()
            seeded = self._seed_recent_keys(files)
            logger.info(
                "tracelearn collector: start-up replay done in %.1f s (%d keys seeded for de-duplication)",
                time.monotonic() - started,
                seeded,
            )
        except Exception:
            logger.exception("tracelearn collector: the start-up replay failed; it is retried every roll period")
        finally:
            with self._phase_changed:
                if self._phase is Phase.STARTING:
                    self._set_phase(Phase.READY)

    def _replay(self) -> list[Path]:
        report = replay_spools(self.config.spans_root, SPANS, self.config.compression)
        if report.segments:
            logger.info(
                "tracelearn collector: replayed %d rows from %d spool segments of exited writers into %d files "
                "(%d duplicates dropped, %d torn tails of unacknowledged writes ignored)",
                report.rows,
                report.segments,
                len(report.files),
                report.duplicates,
                report.torn_tails,
            )
            with self.counters.lock:
                self.counters.spans_replayed += report.rows
        return report.files

    def _seed_recent_keys(self, files: Sequence[Path]) -> int:
        """Remember the keys of the rows just replayed: they may have been committed but never acknowledged."""
        keys: list[int] = []
        for path in files:
            table = pq.read_table(path, columns=["trace_id", "span_id"])
            for trace_hex, span_hex in zip(
                table.column("trace_id").to_pylist(), table.column("span_id").to_pylist(), strict=True
            ):
                keys.append(span_key(int(trace_hex, 16), int(span_hex, 16)))
        kept = keys[-self.recent.capacity :] if self.recent.capacity > 0 else []
        self.recent.add_all(kept)
        return len(kept)

    def _roll(self, action: Any) -> bool:
        """Run a roll; on a write failure refuse requests until the disk takes writes again."""
        started = time.monotonic()
        rows = self.writer.rows_written
        try:
            files: list[Path] = action()
        except WriteError as exc:
            self.health.failed(exc)
            with self.counters.lock:
                self.counters.write_failures += 1
            return False
        if files:
            with self.counters.lock:
                self.counters.files_rolled += len(files)
            logger.info(
                "tracelearn collector: rolled %d spans into %d Parquet files in %.2f s",
                self.writer.rows_written - rows,
                len(files),
                time.monotonic() - started,
            )
        return True

    def _probe(self) -> None:
        """While writes are refused: roll what waits (the real test), or probe the spool's disk."""
        if self.writer.buffered_rows:
            if self._roll(self.writer.flush):
                self.health.recovered()
            return
        try:
            probe_disk(self.writer.spool_directory)
        except OSError:
            return
        self.health.recovered()

    # --- reporting

    def status(self, count_files: bool = True) -> dict[str, Any]:
        """The numbers ``tracelearn collector status`` prints (``/status``); ``count_files`` walks the dataset."""
        ready, reason = self.ready
        spool = self.writer.spool_directory
        segments = sorted(spool.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")) if spool.is_dir() else []
        spool_bytes = 0
        for segment in segments:
            with contextlib.suppress(OSError):
                spool_bytes += segment.stat().st_size
        try:
            free = shutil.disk_usage(self.config.data_root if self.config.data_root.exists() else Path.cwd()).free
        except OSError:
            free = -1
        root = self.config.spans_root
        files = len(dataset_files(root)) if count_files and root.is_dir() else None
        buffered = self.writer.buffered_rows
        counters = self.counters
        with counters.lock:
            return {
                "ready": ready,
                "reason": reason,
                "data": str(self.config.data_root),
                "uptime_s": round(time.time() - self._started_at, 1),
                "queue_bytes": self.queue.depth,
                "queue_limit_bytes": self.queue.limit,
                "spans_accepted": counters.spans_accepted,
                "spans_spooled": counters.spans_spooled,
                "spans_written": self.writer.rows_written,
                "spans_replayed": counters.spans_replayed,
                "spans_duplicate": counters.spans_duplicate,
                "spans_rejected": dict(sorted(counters.spans_rejected.items())),
                "buffered_rows": buffered,
                "attribute_values_truncated": counters.attribute_values_truncated,
                "span_items_dropped": counters.span_items_dropped,
                "dedup_window_keys": len(self.recent),
                "dedup_window_capacity": self.recent.capacity,
                "commits": counters.commits,
                "write_failures": counters.write_failures,
                "files_rolled": counters.files_rolled,
                "spans_files": files,
                "spool_segments": len(segments),
                "spool_bytes": spool_bytes,
                "disk_free_bytes": free,
                "feedback_accepted": counters.feedback_accepted,
                "feedback_rejected": counters.feedback_rejected,
                "requests": {
                    f"{front} {path} {code}": n for (front, path, code), n in sorted(counters.requests.items())
                },
            }

    def metrics_text(self) -> str:
        """Prometheus text exposition format 0.0.4 (``/metrics``)."""
        status = self.status(count_files=False)
        with self.counters.lock:
            requests = sorted(self.counters.requests.items())
            commit_lines = self.counters.commit_seconds.lines(f"{METRIC_PREFIX}commit_seconds")
        lines: list[str] = []
        for name, kind, help_text, key in SCALAR_METRICS:
            lines += [f"# HELP {METRIC_PREFIX}{name} {help_text}", f"# TYPE {METRIC_PREFIX}{name} {kind}"]
            lines.append(f"{METRIC_PREFIX}{name} {int(status[key])}")
        lines += _labelled(
            "spans_rejected_total",
            "Decoded spans not kept, by reason (requests refused before decoding count in requests_total).",
            [(f'reason="{reason}"', n) for reason, n in status["spans_rejected"].items()],
        )
        lines += _labelled(
            "requests_total",
            "Answered requests by front, path and status code.",
            [(f'front="{front}",path="{path}",code="{code}"', n) for (front, path, code), n in requests],
        )
        lines.append(f"# HELP {METRIC_PREFIX}commit_seconds Duration of one group commit (spool write and fsync).")
        lines.append(f"# TYPE {METRIC_PREFIX}commit_seconds histogram")
        lines += commit_lines
        return "\n".join(lines) + "\n"


METRIC_PREFIX = "tracelearn_collector_"
# (metric name, type, help, key of ``OtlpReceiver.status()``)
SCALAR_METRICS = (
    ("ready", "gauge", "1 while spans are accepted.", "ready"),
    ("spans_accepted_total", "counter", "Spans acknowledged as durable (duplicates included).", "spans_accepted"),
    ("spans_spooled_total", "counter", "New spans appended to the write-ahead spool.", "spans_spooled"),
    ("spans_written_total", "counter", "Spans rolled into Parquet files from this process's spool.", "spans_written"),
    ("spans_replayed_total", "counter", "Spans replayed from spools of exited writers.", "spans_replayed"),
    ("spans_duplicate_total", "counter", "Spans acknowledged without writing: committed recently.", "spans_duplicate"),
    (
        "attribute_values_truncated_total",
        "counter",
        "Attribute values cut to TRACELEARN_MAX_ATTRIBUTE_BYTES.",
        "attribute_values_truncated",
    ),
    (
        "span_items_dropped_total",
        "counter",
        "Attributes, events and links beyond the span count limits.",
        "span_items_dropped",
    ),
    ("queue_bytes", "gauge", "Bytes of request bodies being read, decoded or committed.", "queue_bytes"),
    ("queue_limit_bytes", "gauge", "The write queue bound (429 above it).", "queue_limit_bytes"),
    ("buffered_rows", "gauge", "Spooled rows in memory waiting for the roll into Parquet.", "buffered_rows"),
    ("spool_bytes", "gauge", "Bytes of spool segments on disk.", "spool_bytes"),
    ("disk_free_bytes", "gauge", "Free bytes on the data root's filesystem.", "disk_free_bytes"),
    ("dedup_window_keys", "gauge", "Span keys remembered for de-duplication.", "dedup_window_keys"),
    ("commits_total", "counter", "Group commits (one spool write and fsync each).", "commits"),
    ("write_failures_total", "counter", "Spool appends and rolls the disk refused.", "write_failures"),
    ("files_rolled_total", "counter", "Parquet files written by rolls.", "files_rolled"),
    ("feedback_accepted_total", "counter", "Feedback items written.", "feedback_accepted"),
    ("feedback_rejected_total", "counter", "Feedback items in rejected requests.", "feedback_rejected"),
)


def _labelled(name: str, help_text: str, samples: Iterable[tuple[str, int]]) -> list[str]:
    lines = [f"# HELP {METRIC_PREFIX}{name} {help_text}", f"# TYPE {METRIC_PREFIX}{name} counter"]
    return lines + [f"{METRIC_PREFIX}{name}{{{labels}}} {value}" for labels, value in samples]
