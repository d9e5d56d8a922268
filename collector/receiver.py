"""The OTLP receiver's core: a request is acknowledged once its body is durable in the request log; rows come after.

Owns what both protocol fronts (``otlp_http``, ``otlp_grpc``) share, composed from one part per concern:

- **Admission** (``backpressure``): 503 while starting (the replay), draining, or while the disk
  refuses writes; 429 while the memory of requests in flight is at ``--queue-bytes`` or the
  conversion is ``max_backlog_bytes`` behind; 413 for a request that alone needs more than the queue.
- **Validation** (``otlp_validate``): each span parsed and checked on the request path, so what a
  client hears in ``partial_success`` (rejected spans, dropped items) is known before acknowledging.
- **Group commit** (``group_commit``): the request's body, with the positions of the spans not to
  keep, appended to the write-ahead request log (``request_log``) with other requests in one write
  and one fsync; duplicates of recently committed spans dropped (``dedup``), across restarts too.
- **Conversion** (``maintenance``, ``conversion``): sealed log segments become Parquet files in a
  background thread; what cannot be converted or written is quarantined with its reason.
- **Feedback** items (``/v1/feedback``): validated, bounded in dates, written durably (``feedback``).
- Counters (``metrics``) behind ``/metrics`` and ``/status``.

An acknowledged span is on disk at acknowledgement (in the request log), and afterwards in one
Parquet file or in the quarantine with its reason; a retry within the de-duplication window is
acknowledged without being written twice.

May import: tracelearn.collector, tracelearn.schemas, pyarrow, orjson. Never grpc, http.server,
polars, torch or airflow.
"""

import contextlib
import enum
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from tracelearn.collector.backpressure import (
    RETRY_AFTER_QUEUE_FULL,
    RETRY_AFTER_STARTING,
    RETRY_AFTER_UNAVAILABLE,
    QueueFullError,
    Reservation,
    UnavailableError,
    WriteHealth,
    WriteQueue,
)
from tracelearn.collector.conversion import MAX_BATCH_BYTES
from tracelearn.collector.dedup import DEFAULT_DEDUP_WINDOW, KeyIndex, RecentSpanKeys
from tracelearn.collector.feedback import FeedbackError, FeedbackItem, append_feedback, check_dates, feedback_item
from tracelearn.collector.group_commit import COMMIT_BYTES_PER_SPAN, GroupCommitter, PendingRequest
from tracelearn.collector.maintenance import Maintenance
from tracelearn.collector.metrics import ReceiverCounters, ThrottledWarnings, metrics_text
from tracelearn.collector.otlp_decode import media_type_of
from tracelearn.collector.otlp_spans import DEFAULT_LIMITS, DecodeLimits
from tracelearn.collector.otlp_validate import DEFAULT_MAX_PARTITIONS, json_parse_memory, validate_request
from tracelearn.collector.otlp_wire import Body
from tracelearn.collector.quarantine import Quarantine
from tracelearn.collector.request_log import RequestLog
from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.spool import SPOOL_DIR, pending_segments
from tracelearn.schemas.dataset import dataset_files
from tracelearn.schemas.tables import SPANS

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 16 * MIB
DEFAULT_QUEUE_BYTES = 64 * MIB
DEFAULT_MAX_BACKLOG_BYTES = 1024 * MIB
# How long a request waits for its commit before it is answered 503 (a stuck disk); the commit may
# still land, and the client's retry is then a duplicate the window drops.
COMMIT_TIMEOUT_SECONDS = 30.0
MAX_FEEDBACK_ITEMS = 10_000
# Memory of a feedback request beyond its parsed JSON: per item (the validated item), and per body
# byte (the body, its strings again in the Arrow table, the Parquet file being built).
FEEDBACK_ITEM_BYTES = 1024
FEEDBACK_BODY_FACTOR = 3


class InvalidFeedbackError(ValueError):
    """A feedback request has invalid items (HTTP 400); ``errors`` name each item's index and field."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(f"{len(errors)} feedback problem(s), nothing was written: " + "; ".join(errors[:20]))
        self.errors = errors


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
    max_partitions: int = DEFAULT_MAX_PARTITIONS
    max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES

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


class Phase(enum.Enum):
    STARTING = "replaying the spool left by exited writers"
    READY = "ready"
    DRAINING = "shutting down"
    CLOSED = "closed"


@dataclass(frozen=True)
class ShutdownReport:
    """What ``close()`` did: spans converted into Parquet at shutdown, and segments left for the next start."""

    spans_converted: int
    files: int
    segments_left: int


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
        self.quarantine = Quarantine(config.spans_root)
        spool = config.spans_root / SPOOL_DIR
        self.maintenance = Maintenance(
            config.spans_root, config.compression, config.max_attribute_bytes, config.limits, config.roll_seconds,
            self.counters, self.health, self.recent, KeyIndex(spool, config.dedup_window), self._replayed,
        )
        self._committer = GroupCommitter(
            RequestLog(spool, min(config.roll_bytes, MAX_BATCH_BYTES)), self.recent, self.counters, self.health.failed,
            self.maintenance.submit, config.roll_bytes, config.roll_seconds,
        )
        self._phase = Phase.STARTING
        self._phase_changed = threading.Condition()
        self._in_flight = 0
        self._started_at = time.time()

    # --- lifecycle

    def start(self) -> None:
        """Replay exited writers' spools and seed the de-duplication window, in the background."""
        self.maintenance.start()

    def _replayed(self) -> None:
        with self._phase_changed:
            if self._phase is Phase.STARTING:
                self._set_phase(Phase.READY)

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
        """Commit what is queued, convert every logged request into Parquet, stop the background thread."""
        self.drain()
        done_before = self.maintenance.own_spans_done
        files_before = self.counters.files_rolled
        self._committer.stop()
        self.maintenance.finish()
        with self._phase_changed:
            self._set_phase(Phase.CLOSED)
        report = ShutdownReport(
            spans_converted=self.maintenance.own_spans_done - done_before,
            files=self.counters.files_rolled - files_before,
            segments_left=self.maintenance.segments_left,
        )
        logger.info(
            "tracelearn collector: shutdown converted %d spans into %d files under %s",
            report.spans_converted,
            report.files,
            self.config.spans_root,
        )
        if report.segments_left:
            logger.warning(
                "tracelearn collector: %d request log segments could not be converted into Parquet; they stay "
                "under %s and land in Parquet when the collector starts again",
                report.segments_left,
                self.config.spans_root / SPOOL_DIR,
            )
        return report

    def _set_phase(self, phase: Phase) -> None:
        self._phase = phase
        self._phase_changed.notify_all()

    # --- requests

    def check_accepting(self) -> None:
        """Raise the refusal a request would get now (before its body is read or decoded)."""
        if self._phase is not Phase.READY:
            retry = RETRY_AFTER_STARTING if self._phase is Phase.STARTING else RETRY_AFTER_UNAVAILABLE
            raise UnavailableError(f"the collector is {self._phase.value}", retry)
        problem = self.health.problem
        if problem is not None:
            raise UnavailableError(f"the disk refuses writes: {problem}", RETRY_AFTER_UNAVAILABLE)
        if self.queue.full():
            raise QueueFullError(
                f"the write queue is at its bound of {self.queue.limit} bytes; retry later", RETRY_AFTER_QUEUE_FULL
            )
        backlog = self.maintenance.backlog_bytes
        if backlog > self.config.max_backlog_bytes:
            raise QueueFullError(
                f"the conversion into Parquet is {backlog} bytes of requests behind; retry later",
                RETRY_AFTER_UNAVAILABLE,
            )

    @contextlib.contextmanager
    def _request(self, reservation: Reservation | None) -> Iterator[Reservation]:
        """A request in flight: admitted now, waited for by ``drain``, its memory in the write queue."""
        with self._phase_changed:
            if reservation is None:  # a caller's reservation was admitted when its body began
                self.check_accepting()
            self._in_flight += 1
        try:
            with contextlib.ExitStack() as held:
                yield reservation if reservation is not None else held.enter_context(self.queue.reserved())
        finally:
            with self._phase_changed:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._phase_changed.notify_all()

    def reserve(self) -> contextlib.AbstractContextManager[Reservation]:
        """Queue bytes for a request whose body is still being read: the front grows it as it reads."""
        return self.queue.reserved()

    def export_traces(self, body: Body, content_type: str, reservation: Reservation | None = None) -> ExportOutcome:
        """Validate an ``ExportTraceServiceRequest`` body, commit it durably, say what was kept.

        The request's memory counts in the write queue until its commit ends: in ``reservation``
        (from ``reserve``, held by the caller since it began reading the body) or in one of its own.
        Raises ``OtlpDecodeError`` (malformed body), ``QueueFullError``, ``RequestTooLargeError`` or
        ``UnavailableError``.
        """
        config = self.config
        with self._request(reservation) as held:
            held.grow(len(body) - held.nbytes)
            validated = validate_request(
                body, media_type_of(content_type), config.limits, config.max_attribute_bytes, config.max_partitions,
                held.grow,
            )
            # The parse is over: what waits for the commit is the body, the keys and the positions, and
            # what the commit makes of them.
            kept = len(validated.accepted)
            held.resize(len(body) + len(validated.keys) + (4 + COMMIT_BYTES_PER_SPAN) * kept)
            decoded = validated.decoded
            counters = self.counters
            counters.rejected("invalid", decoded.rejected_spans)
            with counters.lock:
                counters.attribute_values_truncated += validated.truncated_values
                counters.span_items_dropped += decoded.dropped_items
            message = validated.message(config.max_attribute_bytes)
            if message:
                self.warnings.warn("partial", f"kept {kept} of {validated.spans} spans of a request: {message}")
            if not validated.accepted:
                return ExportOutcome(0, 0, decoded.rejected_spans, message)
            everything = len(validated.accepted) == validated.spans
            pending = PendingRequest(
                validated.media_type, body, validated.spans, None if everything else validated.accepted,
                bytes(validated.keys), validated.expanded_bytes,
            )
            try:
                self._committer.commit(pending, config.commit_timeout_s)
            except UnavailableError:
                counters.rejected("unavailable", len(validated.accepted))
                raise
        return ExportOutcome(pending.written, pending.duplicates, decoded.rejected_spans, message)

    def export_feedback(self, body: Body, reservation: Reservation | None = None) -> int:
        """Validate a JSON feedback object or list of objects and write it durably; returns the items.

        Raises ``InvalidFeedbackError`` (nothing is written when any item is invalid),
        ``QueueFullError``, ``RequestTooLargeError`` or ``UnavailableError``.
        """
        with self._request(reservation) as held:
            needs = FEEDBACK_BODY_FACTOR * len(body) + json_parse_memory(body) + FEEDBACK_ITEM_BYTES * body.count(b"{")
            held.grow(needs - held.nbytes)
            items = self._feedback_items(body)
            try:
                append_feedback(self.config.data_root, items)
            except OSError as exc:
                self.health.failed(exc)
                raise UnavailableError(f"the disk refuses writes: {exc}", RETRY_AFTER_UNAVAILABLE) from exc
            with self.counters.lock:
                self.counters.feedback_accepted += len(items)
            return len(items)

    def _feedback_items(self, body: Body) -> list[FeedbackItem]:
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidFeedbackError([f"the body is not JSON: {exc}"]) from None
        raws = raw if isinstance(raw, list) else [raw]
        if not raws:
            raise InvalidFeedbackError(["the body is an empty list; send an object or a list of objects"])
        if len(raws) > MAX_FEEDBACK_ITEMS:
            raise InvalidFeedbackError([f"the body holds {len(raws)} items; at most {MAX_FEEDBACK_ITEMS} per request"])
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
        if not errors:
            try:
                check_dates(items)
            except FeedbackError as exc:
                errors.append(str(exc))
        if errors:
            with self.counters.lock:
                self.counters.feedback_rejected += len(raws)
            raise InvalidFeedbackError(errors)
        return items

    def count_request(self, front: str, path: str, code: str) -> None:
        """Count one answered request for ``/metrics`` (the fronts call this for every answer)."""
        self.counters.count_request(front, path, code)

    # --- reporting

    def status(self, count_files: bool = True) -> dict[str, Any]:
        """The numbers ``tracelearn collector status`` prints (``/status``); ``count_files`` walks the dataset."""
        ready, reason = self.ready
        segments = pending_segments(self.config.spans_root / SPOOL_DIR)
        spool_bytes = 0
        for path in segments:
            with contextlib.suppress(OSError):
                spool_bytes += path.stat().st_size
        try:
            free = shutil.disk_usage(self.config.data_root if self.config.data_root.exists() else Path.cwd()).free
        except OSError:
            free = -1
        root = self.config.spans_root
        files = len(dataset_files(root)) if count_files and root.is_dir() else None
        quarantined = self.quarantine.summary()
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
                "spans_written": counters.spans_written,
                "spans_replayed": counters.spans_replayed,
                "spans_duplicate": counters.spans_duplicate,
                "spans_rejected": dict(sorted(counters.spans_rejected.items())),
                "spans_quarantined": counters.spans_quarantined,
                "segments_quarantined": counters.segments_quarantined,
                "spans_awaiting_conversion": max(0, counters.spans_spooled - self.maintenance.own_spans_done),
                "conversion_backlog_bytes": self.maintenance.backlog_bytes,
                "attribute_values_truncated": counters.attribute_values_truncated,
                "span_items_dropped": counters.span_items_dropped,
                "dedup_window_keys": len(self.recent),
                "dedup_window_capacity": self.recent.capacity,
                "commits": counters.commits,
                "write_failures": counters.write_failures,
                "conversion_failures": counters.conversion_failures,
                "files_rolled": counters.files_rolled,
                "spans_files": files,
                "spool_segments": len(segments),
                "spool_bytes": spool_bytes,
                "quarantine_entries": quarantined.entries,
                "quarantine_spans": quarantined.spans,
                "quarantine_bytes": quarantined.bytes,
                "disk_free_bytes": free,
                "feedback_accepted": counters.feedback_accepted,
                "feedback_rejected": counters.feedback_rejected,
                "requests": {
                    f"{front} {path} {code}": n for (front, path, code), n in sorted(counters.requests.items())
                },
            }

    def metrics_text(self) -> str:
        """Prometheus text exposition format 0.0.4 (``/metrics``)."""
        return metrics_text(self.status(count_files=False), self.counters)
