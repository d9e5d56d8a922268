"""The in-process OpenTelemetry span exporter that lands spans in the Parquet spans dataset.

Registered as the ``opentelemetry_traces_exporter`` entry point ``tracelearn``, so
``opentelemetry-instrument --traces_exporter tracelearn`` selects it. It is built with no arguments
and reads ``CaptureSettings`` from the environment.

Durability: ``force_flush()`` (the end of every rollout) appends the spans exported since the last
flush to the write-ahead spool and fsyncs it; a flushed span is on disk. Parquet files are written
from memory when a partition's buffer reaches ``TRACELEARN_ROLL_BYTES`` or ``TRACELEARN_ROLL_SECONDS``
(checked as spans arrive, and every second by a small thread, so an idle agent's last rollouts roll
too) and at shutdown. A new exporter first replays the spools that exited writers on this host left
behind (a killed agent's flushed rollouts), and its thread does so again once per roll period (a
forked worker that ended without shutdown), so those land in Parquet too, exactly once.

It never raises into the agent: a failed append or write (unwritable directory, disk full) is logged
once, the rows stay buffered and are retried at the next flush or roll, and spans that cannot be
kept at shutdown are counted in the log.
"""

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracelearn.collector.parquet_writer import PartitionedParquetWriter, WriteError
from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_rows import SpanColumns, from_readable_span
from tracelearn.collector.spool import replay_spools
from tracelearn.schemas.tables import SPANS

logger = logging.getLogger(__name__)

# Rows kept in memory while the disk refuses writes, before new spans are counted as lost.
MAX_BUFFERED_ROWS_ON_ERROR = 1_000_000
# How often the roll thread checks buffer ages while no spans arrive.
ROLL_CHECK_SECONDS = 1.0


def _reset_in_child(exporter_ref: "weakref.ref[ParquetSpanExporter]") -> None:
    exporter = exporter_ref()
    if exporter is not None:
        exporter.reset_in_child()


class ParquetSpanExporter(SpanExporter):
    """Converts SDK spans into spans-table rows, spools them at each flush, rolls them into Parquet files."""

    def __init__(self, settings: CaptureSettings | None = None) -> None:
        self.settings = settings or CaptureSettings.from_env()
        self._replay_failed = False
        self._replay_exited_writers()
        self.writer = PartitionedParquetWriter(
            self.settings.spans_root,
            SPANS,
            roll_bytes=self.settings.roll_bytes,
            roll_seconds=self.settings.roll_seconds,
            compression=self.settings.compression,
        )
        self.columns = SpanColumns(self.settings.max_attribute_bytes)
        self.spans_lost = 0
        self._lock = threading.Lock()
        self._write_failed = False
        self._stopping = threading.Event()
        self._start_roller()
        os.register_at_fork(after_in_child=functools.partial(_reset_in_child, weakref.ref(self)))

    def reset_in_child(self) -> None:
        """In a forked child (a worker pool): start clean, with a roll thread of its own.

        The parent may have been mid-export (its lock held, spans half added); threads do not survive fork.
        """
        self._lock = threading.Lock()
        self.columns = SpanColumns(self.settings.max_attribute_bytes)
        self._start_roller()

    def _start_roller(self) -> None:
        """Start the thread that rolls buffers by age while no spans arrive and replays exited writers."""
        self._roller = threading.Thread(target=self._roll_when_old, name="tracelearn-roll", daemon=True)
        self._roller.start()

    def _roll_when_old(self) -> None:
        interval = min(self.settings.roll_seconds, ROLL_CHECK_SECONDS)
        next_replay = time.monotonic() + self.settings.roll_seconds
        try:
            while not self._stopping.wait(interval):
                self._write(self.writer.roll_due)
                if time.monotonic() >= next_replay:
                    self._replay_exited_writers()
                    next_replay = time.monotonic() + self.settings.roll_seconds
        except Exception:  # the exporter's other paths still roll; only idle-time rolling stops
            logger.exception("tracelearn: the roll thread failed; buffers roll when spans arrive or at shutdown")

    def _replay_exited_writers(self) -> None:
        """Land the spools of exited writers on this host (never a live writer's) as Parquet files."""
        root = self.settings.spans_root
        try:
            report = replay_spools(root, SPANS, self.settings.compression)
        except Exception:
            if not self._replay_failed:
                logger.exception("tracelearn: replaying the spool under %s failed; retried every roll period", root)
            self._replay_failed = True
            return
        self._replay_failed = False
        if report.segments:
            logger.warning(
                "tracelearn: replayed %d spans from %d spool segments that exited writers left under %s "
                "(%d duplicates dropped, %d torn tails of unacknowledged writes ignored)",
                report.rows,
                report.segments,
                root,
                report.duplicates,
                report.torn_tails,
            )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            with self._lock:
                if self._write_failed and self.writer.buffered_rows >= MAX_BUFFERED_ROWS_ON_ERROR:
                    self.spans_lost += len(spans)
                    return SpanExportResult.FAILURE
                for span in spans:
                    self.columns.add(from_readable_span(span))
                self.writer.add(self.columns.take())
            self._write(self.writer.roll_due)
            return SpanExportResult.SUCCESS
        except Exception:
            logger.exception("tracelearn: converting %d spans failed; they are not exported", len(spans))
            self.spans_lost += len(spans)
            return SpanExportResult.FAILURE

    def _write(self, action: Callable[[], object]) -> bool:
        """Run a writer action; report the first failure and the recovery, not every retry."""
        try:
            written = action()
        except WriteError as exc:
            if not self._write_failed:
                logger.error("tracelearn: %s; spans stay buffered in memory and are retried", exc)
            self._write_failed = True
            return False
        if self._write_failed and written:
            logger.warning("tracelearn: writing spans works again under %s", self.settings.spans_root)
            self._write_failed = False
        return True

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Make every exported span durable: roll if due, else append what is new to the spool."""
        rolled = self._write(self.writer.roll_due)
        spooled = self._write(self.writer.spool_pending)
        return rolled and spooled

    def shutdown(self) -> None:
        self._stopping.set()
        self._roller.join(timeout=30)
        if not self._write(self.writer.flush):
            self._write(self.writer.spool_pending)
            unspooled = self.writer.unspooled_rows
            spooled = self.writer.buffered_rows - unspooled
            if spooled:
                logger.warning(
                    "tracelearn: %d spans could not be written to Parquet before shutdown; they are in the "
                    "spool under %s and land in Parquet when the next writer on this host starts",
                    spooled,
                    self.writer.spool_directory,
                )
            if unspooled:
                self.spans_lost += unspooled
                logger.error("tracelearn: %d spans could not be written before shutdown and are lost", unspooled)
        self.writer.close()
        if self.spans_lost:
            logger.error("tracelearn: %d spans were lost in total", self.spans_lost)
