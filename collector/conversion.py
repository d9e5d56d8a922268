"""A sealed request log segment becomes Parquet files: the sidecar's conversion, off the request path.

``convert_log_segment`` reads a segment's records one at a time, decodes each body span by span
(skipping the positions the record lists: rejected or duplicates), builds rows with ``SpanColumns``
(the in-process exporter's normalization) in batches of ``BUILD_SPANS`` spans, and writes one Parquet
file per partition and conversion batch: ``part-<segment stem>.parquet``, then ``+1``, ``+2``... when
the segment's rows were cut into several batches of about ``chunk_bytes`` (fixed in the segment's
header, and cut from the sizes its records carry, so a replay cuts exactly the same batches). A file
that exists already is skipped: a conversion interrupted by a crash, or a second replay, never lands
a row twice. Each batch's keys go to the de-duplication index once its files are written, and the
segment is deleted at the end. Memory: one record's body and layout, ``BUILD_SPANS`` spans of Python
objects, and one batch of rows (about ``chunk_bytes``), written as built (never combined into one copy).

Nothing acknowledged is lost on the way:

- a span the row builder cannot convert, or that no longer decodes, is set aside with its request
  body in the quarantine (``quarantine``), named by segment and record, with the reason;
- rows whose partition directory refuses them (a path the filesystem will not take) are quarantined
  as a Parquet file, and the other partitions go on;
- the damaged rest of a segment (a record failing its checksum with data after it) is quarantined
  as bytes.

Only a disk that refuses writes (``tracelearn.storage.atomic_files.is_disk_error``) stops a conversion: ``OSError`` is
raised, the segment stays, and the caller retries it.

May import: tracelearn.collector (otlp_decode, request_log, span_rows, spool, quarantine, dedup),
tracelearn.storage, tracelearn.schemas, pyarrow.
"""

import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from tracelearn.collector.dedup import KeyIndex
from tracelearn.collector.otlp_decode import PROTOBUF_CONTENT_TYPE, protobuf_layout, request_records
from tracelearn.collector.otlp_spans import DEFAULT_LIMITS, DecodedSpans, DecodeLimits, OtlpDecodeError
from tracelearn.collector.otlp_wire import span_ids
from tracelearn.collector.quarantine import Quarantine, entry_name
from tracelearn.collector.request_log import LogReader, LogRecord
from tracelearn.collector.span_rows import SpanColumns, SpanRecord
from tracelearn.collector.spool import ReplayReport, SegmentName, write_or_quarantine
from tracelearn.schemas.tables import TableSpec
from tracelearn.storage.atomic_files import Partition, partition_directory

logger = logging.getLogger(__name__)

# Spans turned into Arrow rows at a time: bounds the Python objects held during a conversion.
BUILD_SPANS = 1024
# The largest conversion batch (rows of one file per partition). Larger batches cost the kernel more
# than they save: measured on 16k LLM spans, 64 MiB batches took 40-87 us/span of system time (fresh
# pages for the rows, their combined copy, the Parquet buffers), 16 MiB ones 7-10 us, user time alike.
MAX_BATCH_BYTES = 16 * 1024 * 1024
# Between a segment's stem and a conversion batch's number in a file name (never in a stem: see
# ``spool.SegmentName`` and ``storage.atomic_files.path_segment_safe``).
BATCH_SEPARATOR = "+"


@dataclass
class _Failure:
    """Spans of one record that could not become rows."""

    positions: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def build_rows(
    records: Sequence[tuple[int, SpanRecord]], max_attribute_bytes: int, failure: _Failure
) -> tuple[dict[Partition, list[pa.RecordBatch]], int]:
    """Arrow rows of ``records`` by partition, and the values truncated; failing spans go to ``failure``.

    A span that the row builder cannot take is found by halving the batch, so one bad span costs
    a few rebuilds and the others still become rows.
    """
    columns = SpanColumns(max_attribute_bytes)
    try:
        for _, record in records:
            columns.add(record)
        return {partition: [batch] for partition, batch in columns.take().items()}, columns.truncated_values
    except Exception as exc:
        if len(records) == 1:
            failure.positions.append(records[0][0])
            failure.reasons.append(f"span #{records[0][0]} cannot become a row: {type(exc).__name__}: {exc}")
            return {}, 0
    middle = len(records) // 2
    first, truncated_first = build_rows(records[:middle], max_attribute_bytes, failure)
    second, truncated_second = build_rows(records[middle:], max_attribute_bytes, failure)
    for partition, batches in second.items():
        first.setdefault(partition, []).extend(batches)
    return first, truncated_first + truncated_second


class _SegmentConversion:
    """The state of converting one segment: rows waiting for their file, batch by batch."""

    def __init__(
        self,
        path: Path,
        name: SegmentName,
        root: Path,
        spec: TableSpec,
        compression: str,
        max_attribute_bytes: int,
        limits: DecodeLimits,
        key_index: KeyIndex | None,
    ) -> None:
        self.path, self.name, self.root, self.spec = path, name, root, spec
        self.compression, self.max_attribute_bytes, self.limits = compression, max_attribute_bytes, limits
        self.quarantine = Quarantine(root)
        self.report = ReplayReport(segments=1)
        self.key_index = key_index
        self.pending: dict[Partition, list[pa.RecordBatch]] = {}
        self.pending_keys = bytearray()  # 24 bytes per span of the batch
        self.batch_number = 0
        self.batch_bytes = 0.0

    def file_name(self) -> str:
        suffix = f"{BATCH_SEPARATOR}{self.batch_number}" if self.batch_number else ""
        return f"part-{self.name.stem}{suffix}.parquet"

    def write_batch(self) -> None:
        """Write the pending rows, one file per partition, and start the next conversion batch."""
        file_name = self.file_name()
        for partition in list(self.pending):
            batches = self.pending.pop(partition)
            directory = partition_directory(self.root, self.spec.partition_columns, partition)
            entry = entry_name(self.name.stem, str(self.batch_number), *partition)
            if (directory / file_name).exists() or self.quarantine.holds(entry):
                continue  # written before a crash, or by an earlier replay of this segment
            # Written as built, one chunk per row batch: the Parquet writer makes one row group of them
            # all the same, and combining them first copied every row once more (fresh pages each time).
            table = pa.Table.from_batches(batches, schema=self.spec.schema_with_metadata())
            del batches
            written = write_or_quarantine(
                table, directory, file_name, self.compression, self.quarantine, entry, str(self.path)
            )
            if written is None:
                self.report.quarantined_spans += table.num_rows
            else:
                self.report.files.append(written)
                self.report.rows += table.num_rows
        if self.key_index is not None:
            self.key_index.append(bytes(self.pending_keys))
        self.pending, self.pending_keys = {}, bytearray()
        self.batch_number += 1
        self.batch_bytes = 0.0

    def add_rows(self, records: list[tuple[int, SpanRecord]], failure: _Failure) -> None:
        batches, truncated = build_rows(records, self.max_attribute_bytes, failure)
        self.report.truncated_values += truncated
        for partition, built in batches.items():
            self.pending.setdefault(partition, []).extend(built)

    def convert_record(self, record: LogRecord, chunk_bytes: int) -> None:
        request = record.request
        accepted = request.spans - len(request.skipped)
        per_span = request.expanded_bytes / accepted if accepted > 0 else 0.0
        failure = _Failure()
        decoded = DecodedSpans()
        yielded = array("I")  # positions decoded, in order
        building: list[tuple[int, SpanRecord]] = []
        skipped = frozenset(request.skipped)
        try:
            for position, span in request_records(request.body, request.media_type, self.limits, decoded, skipped):
                yielded.append(position)
                self.pending_keys += span.trace_id.to_bytes(16, "big") + span.span_id.to_bytes(8, "big")
                building.append((position, span))
                self.batch_bytes += per_span
                if len(building) >= BUILD_SPANS or self.batch_bytes >= chunk_bytes:
                    self.add_rows(building, failure)
                    building = []
                    if self.batch_bytes >= chunk_bytes:
                        self.write_batch()
        except OtlpDecodeError as exc:
            failure.reasons.append(str(exc))
        if building:
            self.add_rows(building, failure)
        if decoded.rejected_spans or len(yielded) + len(skipped) < request.spans:
            # Accepted when the request came in, refused now: set aside, never dropped.
            lost = sorted(set(range(request.spans)) - skipped - set(yielded))
            failure.positions += lost
            failure.reasons += decoded.reasons or [f"{len(lost)} span(s) no longer decode"]
        if failure.positions:
            self.set_aside(record, failure)

    def set_aside(self, record: LogRecord, failure: _Failure) -> None:
        entry = entry_name(self.name.stem, f"r{record.offset}")
        positions = sorted(set(failure.positions))
        if self.quarantine.request(
            entry, record.request.body, record.request.media_type, positions, failure.reasons, str(self.path)
        ):
            logger.error("tracelearn collector: %d spans of a request in %s set aside in %s: %s", len(positions),
                         self.path.name, self.quarantine.directory, "; ".join(failure.reasons[:3]))
        self.report.quarantined_spans += len(positions)

    def set_aside_damage(self, offset: int) -> None:
        with self.path.open("rb") as handle:
            handle.seek(offset)
            rest = handle.read()
        entry = entry_name(self.name.stem, f"damaged-{offset}")
        reason = f"a record at byte {offset} fails its checksum with {len(rest)} bytes after it: unreadable"
        if self.quarantine.raw_bytes(entry, rest, reason, str(self.path)):
            logger.error("tracelearn collector: %s: %s; set aside in %s", self.path, reason, self.quarantine.directory)
        self.report.quarantined_segments += 1


def logged_keys(path: Path, limits: DecodeLimits | None = None) -> bytes:
    """trace_id + span_id (24 bytes each) of the spans a request log segment will land, read without converting.

    What a starting collector remembers of a log it converts later, so that a retry of a span that
    log holds is recognized meanwhile. Protobuf spans are read only up to their ids.
    """
    keys = bytearray()
    for record in LogReader(path).records():
        request = record.request
        skipped = frozenset(request.skipped)
        if request.media_type != PROTOBUF_CONTENT_TYPE:
            limits = limits or DEFAULT_LIMITS
            for _, span in request_records(request.body, request.media_type, limits, DecodedSpans(), skipped):
                keys += span.trace_id.to_bytes(16, "big") + span.span_id.to_bytes(8, "big")
            continue
        try:
            layout = protobuf_layout(request.body)
        except OtlpDecodeError:
            continue  # its conversion sets it aside
        body, position = request.body, 0
        for resource in layout.resources:
            for scope in resource.scopes:
                for start, end in zip(scope.starts, scope.ends, strict=True):
                    if position not in skipped:
                        keys += span_ids(body, start, end)
                    position += 1
    return bytes(keys)


def convert_log_segment(
    path: Path,
    name: SegmentName,
    root: Path,
    spec: TableSpec,
    compression: str,
    max_attribute_bytes: int,
    limits: DecodeLimits | None = None,
    key_index: KeyIndex | None = None,
) -> ReplayReport:
    """Convert the request log segment at ``path`` into Parquet files under ``root``, then delete it.

    Returns what landed, what was quarantined and the torn tail, if any. Raises ``OSError`` when the
    disk refuses writes (the segment stays for a retry), ``LogFormatError`` when the file is not a
    request log. The landed spans' keys go to ``key_index`` (when given), batch by batch, before the
    segment is deleted.
    """
    conversion = _SegmentConversion(
        path, name, root, spec, compression, max_attribute_bytes, limits or DEFAULT_LIMITS, key_index
    )
    reader = LogReader(path)
    for record in reader.records():
        conversion.convert_record(record, reader.chunk_bytes)
    if conversion.pending or conversion.pending_keys:
        conversion.write_batch()
    if reader.damaged_at is not None:
        conversion.set_aside_damage(reader.damaged_at)
    report = conversion.report
    report.torn_tails = int(reader.torn)
    path.unlink(missing_ok=True)
    return report
