"""The in-process OpenTelemetry span exporter that lands spans in the Parquet spans dataset.

Registered as the ``opentelemetry_traces_exporter`` entry point ``tracelearn``, so
``opentelemetry-instrument --traces_exporter tracelearn`` selects it. It is built with no arguments
and reads ``CaptureSettings`` from the environment. It never raises into the agent: a failed write
(unwritable directory, disk full) is logged once, the rows stay buffered and are retried at the next
roll or flush, and spans that cannot be kept at shutdown are counted in the log.
"""

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracelearn.collector.parquet_writer import PartitionedParquetWriter, WriteError
from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_rows import SpanColumns, from_readable_span
from tracelearn.schemas.tables import SPANS

logger = logging.getLogger(__name__)

# Rows kept in memory while the disk refuses writes, before new spans are counted as lost.
MAX_BUFFERED_ROWS_ON_ERROR = 1_000_000


class ParquetSpanExporter(SpanExporter):
    """Converts SDK spans into spans-table rows and writes them as atomic, partitioned Parquet files."""

    def __init__(self, settings: CaptureSettings | None = None) -> None:
        self.settings = settings or CaptureSettings.from_env()
        self.writer = PartitionedParquetWriter(
            self.settings.spans_root,
            SPANS,
            roll_bytes=self.settings.roll_bytes,
            roll_seconds=self.settings.roll_seconds,
            compression=self.settings.compression,
        )
        self.columns = SpanColumns(self.settings.max_attribute_bytes)
        self.spans_received = 0
        self.spans_lost = 0
        self._lock = threading.Lock()
        self._write_failed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            with self._lock:
                if self.writer.buffered_rows >= MAX_BUFFERED_ROWS_ON_ERROR and self._write_failed:
                    self.spans_lost += len(spans)
                    return SpanExportResult.FAILURE
                for span in spans:
                    self.columns.add(from_readable_span(span))
                self.spans_received += len(spans)
                self.writer.add(self.columns.take())
            self._write(self.writer.roll_due)
            return SpanExportResult.SUCCESS
        except Exception:
            logger.exception("tracelearn: converting %d spans failed; they are not exported", len(spans))
            self.spans_lost += len(spans)
            return SpanExportResult.FAILURE

    def _write(self, action: Callable[[], list[Path]]) -> bool:
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
        return self._write(self.writer.flush)

    def shutdown(self) -> None:
        if not self._write(self.writer.flush):
            lost = self.writer.buffered_rows
            self.spans_lost += lost
            logger.error("tracelearn: %d spans could not be written before shutdown and are lost", lost)
        if self.spans_lost:
            logger.error("tracelearn: %d spans were lost in total", self.spans_lost)
