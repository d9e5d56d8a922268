"""Compaction: the small files of a spans partition merged into a few files with large row groups.

Owns the work of ``tracelearn spans compact`` on one ``date=D/service=S`` directory: choosing the
inputs (``compaction_plan``), writing the merged files, the lock and journal files of a compaction
and finishing or rolling back a compaction a crash interrupted (``compaction_safety``). May import
tracelearn.schemas, tracelearn.storage, the collector's spool and compaction_* modules, and pyarrow;
never polars, torch or airflow.

Inputs. Only finished files: names ``part-*.parquet`` directly in the partition directory (never a
``.tmp-`` file being written, never ``_spool/``), modified at least ``min_age_seconds`` ago, whose
spool segment is gone (while ``_spool/spool-<stem>.arrows`` or ``requests-<stem>.otlp`` exists a
replay may write ``part-<stem>.parquet`` (or ``part-<stem>+<n>.parquet``) again once it is missing,
so merging that file away would land its rows twice), of the spans table at this tracelearn's
schema version (or an older one a registered migration lifts), with the spans columns, and smaller
than the target. A file that appears after
the run listed the directory is not an input: the collector may keep writing meanwhile.

Outputs. Inputs are packed first-fit, in name (time) order, into groups of at most
``target_bytes`` uncompressed (estimated from the Parquet metadata); a group of one file stays as
it is. First-fit leaves no two groups that would fit together, and each output records the size it
was planned at (``tracelearn.compaction.planned_bytes``), so a second run finds nothing to merge.
One group is in memory at a time, read row group by row group: the first row of each (trace_id,
span_id) is kept (inputs in name order; across the outputs of one run, the earlier output's), rows
are sorted by (trace_id, start_time, span_id) and written in row groups of about
``row_group_bytes``, compressed like the collector's files, with the table's schema and version
metadata. Outputs are named like the collector's files, their writer id ``compact<run id>``.

Commit of one output, in this order:
  1. the rows go to a temp file (``.tmp-part-...-compact<id>-...parquet.tmp``);
  2. the journal ``_compaction-<id>-<n>.json`` (the output's name and its inputs') is written
     atomically;
  3. the temp file is fsynced and renamed to ``part-...-compact<id>-<n>.parquet``, the directory fsynced;
  4. the inputs are deleted, the directory fsynced;
  5. the journal is deleted.
Each run first holds ``_compaction.lock`` (created with O_EXCL; taken over when the process that
holds it, on this host, is gone), then finishes what a crash left: a journal whose output exists
has its remaining inputs deleted (roll forward), one whose output does not has its temp file
deleted (roll back, the inputs were never touched).

What a reader that lists the directory sees (readers skip names starting with ``_`` or ``.``):
  - every row at least once, at every instant and across any crash: no row is ever missing;
  - before step 3 the inputs, after step 4 the output: every row exactly once;
  - between steps 3 and 4 (a few unlinks; after a crash there, until compact runs again on the
    partition) the output and the inputs not deleted yet, whose rows it then sees twice. The journal
    is in the directory throughout that window: a reader that drops the names
    :func:`superseded_inputs` returns for its listing reads every row once; one that de-duplicates
    by (trace_id, span_id), as the pipeline does, reads every span once at every instant anyway.
  Renaming an invisible output in after the inputs are gone would trade those duplicates for rows
  missing from every reader (for as long as a crash there stays unrepaired), so it is not done.
  A reader that listed an input and opens it after step 4 gets ``FileNotFoundError`` and lists
  again; one that had it open reads it to the end. A row dropped as a duplicate is a copy of a span
  kept in the same output or in one committed before it.

Limits. A lock held from another host is never taken over (its process cannot be checked): the
error names the file to delete. Just before committing, a run checks that the lock still carries
its token and that every input is still there, and rolls that output back if not, so a lock taken
over by mistake or an input deleted by hand cannot make rows appear twice or come back.
"""

import datetime as dt
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.collector.compaction_plan import (
    PLANNED_BYTES_KEY,
    InputFile,
    PartitionPlan,
    PlannedOutput,
    SkippedFile,
    plan_partition,
)
from tracelearn.collector.compaction_safety import (
    JOURNAL_PREFIX,
    JOURNAL_SUFFIX,
    LOCK_NAME,
    WRITER_ID_PREFIX,
    CompactionConflictError,
    CompactionError,
    CompactionEvent,
    CompactionLockedError,
    EventListener,
    LockHolder,
    Step,
    delete_inputs,
    ignore_event,
    lock_still_held,
    partition_lock,
    read_journals,
    recover_partition,
    superseded_inputs,
    write_journal,
)
from tracelearn.collector.spool import SPAN_KEY, SegmentName, unique_rows
from tracelearn.schemas.migrations import migrate
from tracelearn.schemas.tables import SPANS
from tracelearn.storage.atomic_files import fsync_directory, local_host, path_segment_safe
from tracelearn.storage.atomic_parquet import AtomicParquetWriter

__all__ = [
    "LOCK_NAME",
    "MIB",
    "MIN_AGE_SECONDS",
    "CompactionConflictError",
    "CompactionError",
    "CompactionEvent",
    "CompactionLockedError",
    "CompactionReport",
    "InputFile",
    "PartitionPlan",
    "PlannedOutput",
    "SkippedFile",
    "Step",
    "compact",
    "compact_partition",
    "spans_table_root",
    "superseded_inputs",
]

MIB = 1024 * 1024
TARGET_BYTES = 128 * MIB
ROW_GROUP_BYTES = 128 * MIB
MIN_AGE_SECONDS = 60.0

SORT_KEYS = [("trace_id", "ascending"), ("start_time", "ascending"), ("span_id", "ascending")]
DATE_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")

@dataclass
class CompactionReport:
    """What a run did (or, with ``dry_run``, would do) to the partitions it visited."""

    dry_run: bool = False
    partitions: list[Path] = field(default_factory=list)
    files_read: int = 0
    rows_in: int = 0
    rows_out: int = 0
    duplicates_removed: int = 0
    files_written: list[Path] = field(default_factory=list)
    bytes_before: int = 0  # inputs, on disk
    bytes_after: int = 0  # outputs, on disk
    skipped: list[SkippedFile] = field(default_factory=list)
    planned: list[PlannedOutput] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # what was done about interrupted compactions
    pending_journals: list[Path] = field(default_factory=list)  # dry run: what a real run finishes first

    def absorb(self, other: "CompactionReport") -> None:
        """Add the figures of ``other`` (another partition) to this report."""
        self.partitions += other.partitions
        self.files_read += other.files_read
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.duplicates_removed += other.duplicates_removed
        self.files_written += other.files_written
        self.bytes_before += other.bytes_before
        self.bytes_after += other.bytes_after
        self.skipped += other.skipped
        self.planned += other.planned
        self.recovered += other.recovered
        self.pending_journals += other.pending_journals


# --- Where ------------------------------------------------------------------------------------------


def spans_table_root(data: Path) -> Path:
    """The spans table's directory: ``data/spans`` when ``data`` is a data root holding one, else ``data``."""
    if not data.is_dir():
        raise CompactionError(f"{data}: no such data directory")
    return data / "spans" if (data / "spans").is_dir() else data


def partition_directories(root: Path, date: str, service: str | None = None) -> list[Path]:
    """The ``service=`` directories of ``date=<date>`` under the spans ``root`` (only ``service``'s if given)."""
    if not DATE_FORMAT.fullmatch(date):
        raise CompactionError(f"--date {date!r} is not a date in the form YYYY-MM-DD")
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise CompactionError(f"--date {date!r} is not a date in the form YYYY-MM-DD") from None
    day = root / f"date={date}"
    if not day.is_dir():
        dates = ", ".join(sorted(p.name.removeprefix("date=") for p in root.glob("date=*") if p.is_dir()))
        raise CompactionError(f"{day}: no such partition (dates present: {dates or 'none'})")
    services = sorted(p for p in day.glob("service=*") if p.is_dir())
    if service is None:
        return services
    wanted = day / f"service={path_segment_safe(service)}"
    if wanted not in services:
        present = ", ".join(p.name.removeprefix("service=") for p in services) or "none"
        raise CompactionError(f"{wanted}: no such partition (services that day: {present})")
    return [wanted]


# --- Merging ----------------------------------------------------------------------------------------


def read_inputs(inputs: Sequence[InputFile], on_event: EventListener) -> pa.Table:
    """The rows of ``inputs`` in order, read row group by row group, as the current spans schema."""
    pieces = []
    for item in inputs:
        try:
            parquet = pq.ParquetFile(item.path)
            for index in range(parquet.num_row_groups):
                pieces.append(migrate(parquet.read_row_group(index), SPANS, item.version, str(item.path)))
        except (OSError, pa.ArrowInvalid) as exc:
            raise CompactionConflictError(
                f"{item.path}: cannot be read any more ({exc}); nothing was committed"
            ) from exc
        on_event(CompactionEvent(Step.INPUT_READ, item.path, item.file_bytes))
    return pa.concat_tables(pieces) if pieces else SPANS.schema_with_metadata().empty_table()


def drop_spans_in(table: pa.Table, seen: pa.Table) -> pa.Table:
    """``table`` without the rows whose (trace_id, span_id) is in ``seen`` (order not kept)."""
    if seen.num_rows == 0:
        return table
    row = "__row"
    numbered = table.select(list(SPAN_KEY)).append_column(row, pa.array(range(table.num_rows), pa.int64()))
    kept = numbered.join(seen, keys=list(SPAN_KEY), join_type="left anti", use_threads=False).column(row)
    return table.take(kept)


def merged_rows(table: pa.Table, seen: pa.Table) -> pa.Table:
    """One row per span not in ``seen`` (the first in ``table``'s order), sorted for scan locality."""
    return drop_spans_in(unique_rows(table), seen).sort_by(SORT_KEYS)


def rows_per_row_group(planned_bytes: int, rows: int, row_group_bytes: int) -> int:
    """Rows that make a row group of about ``row_group_bytes`` uncompressed, at the inputs' bytes per row."""
    if rows == 0 or planned_bytes <= 0:
        return max(rows, 1)
    return max(1, int(row_group_bytes * rows / planned_bytes))


def output_schema(planned_bytes: int) -> pa.Schema:
    metadata = {**(SPANS.schema_with_metadata().metadata or {}), PLANNED_BYTES_KEY: str(planned_bytes).encode()}
    return SPANS.schema.with_metadata(metadata)


@dataclass(frozen=True)
class OutputNames:
    """The names one output of a run uses: its file and its journal."""

    file: str
    journal: str

    @classmethod
    def of(cls, run_id: str, sequence: int) -> "OutputNames":
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = SegmentName(stamp, local_host(), os.getpid(), f"{WRITER_ID_PREFIX}{run_id}", sequence)
        return cls(name.parquet_name, f"{JOURNAL_PREFIX}{run_id}-{sequence:06d}{JOURNAL_SUFFIX}")


def commit_output(
    directory: Path,
    rows: pa.Table,
    planned: PlannedOutput,
    names: OutputNames,
    lock: LockHolder,
    compression: str,
    row_group_bytes: int,
    on_event: EventListener,
) -> Path:
    """Steps 1-5 of the module docstring for one output; returns the output's path."""
    output = directory / names.file
    journal = directory / names.journal
    inputs = [item.path for item in planned.inputs]
    writer = AtomicParquetWriter(output_schema(planned.planned_bytes), directory, names.file, compression)
    try:
        writer.write(rows, rows_per_row_group(planned.planned_bytes, planned.rows, row_group_bytes))
        on_event(CompactionEvent(Step.OUTPUT_WRITTEN, writer.temp))
        write_journal(journal, names.file, inputs)
        on_event(CompactionEvent(Step.JOURNAL_WRITTEN, journal))
        # The lock keeps other compactions out; this catches a lock taken over by mistake, and inputs
        # deleted by hand, before the output makes their rows visible twice (or brings them back).
        if not lock_still_held(directory, lock):
            raise CompactionConflictError(
                f"{directory / LOCK_NAME}: no longer held by this run; {names.file} rolled back"
            )
        missing = [path.name for path in inputs if not path.exists()]
        if missing:
            raise CompactionConflictError(
                f"{directory}: {', '.join(missing)} deleted during the run; {names.file} rolled back"
            )
        writer.commit()
    except BaseException:
        writer.abort()
        if not output.exists():
            journal.unlink(missing_ok=True)
        raise  # an output already renamed in keeps its journal: the next run deletes its inputs
    on_event(CompactionEvent(Step.OUTPUT_RENAMED, output))
    delete_inputs(directory, [path.name for path in inputs], on_event)
    journal.unlink()
    fsync_directory(directory)
    return output


def compact_partition(
    directory: Path,
    *,
    target_bytes: int = TARGET_BYTES,
    row_group_bytes: int = ROW_GROUP_BYTES,
    min_age_seconds: float = MIN_AGE_SECONDS,
    compression: str = "zstd",
    dry_run: bool = False,
    on_event: EventListener = ignore_event,
) -> CompactionReport:
    """Merge the small files of one ``service=`` directory (see the module docstring)."""
    if dry_run:
        plan = plan_partition(directory, target_bytes, min_age_seconds)
        return CompactionReport(
            dry_run=True,
            partitions=[directory],
            files_read=sum(len(output.inputs) for output in plan.outputs),
            rows_in=sum(output.rows for output in plan.outputs),
            bytes_before=sum(output.file_bytes for output in plan.outputs),
            skipped=list(plan.skipped),
            planned=list(plan.outputs),
            pending_journals=[journal.path for journal in read_journals(directory)],
        )
    report = CompactionReport(partitions=[directory])
    with partition_lock(directory) as lock:
        report.recovered = recover_partition(directory)
        plan = plan_partition(directory, target_bytes, min_age_seconds)
        report.skipped = list(plan.skipped)
        report.planned = list(plan.outputs)
        on_event(CompactionEvent(Step.PLANNED, directory, sum(output.file_bytes for output in plan.outputs)))
        run_id = uuid.uuid4().hex[:8]
        seen = SPANS.schema_with_metadata().empty_table().select(list(SPAN_KEY))  # spans already written
        for sequence, planned in enumerate(plan.outputs, start=1):
            table = read_inputs(planned.inputs, on_event)
            rows = merged_rows(table, seen)
            names = OutputNames.of(run_id, sequence)
            path = commit_output(directory, rows, planned, names, lock, compression, row_group_bytes, on_event)
            seen = pa.concat_tables([seen, rows.select(list(SPAN_KEY))])
            report.files_read += len(planned.inputs)
            report.rows_in += table.num_rows
            report.rows_out += rows.num_rows
            report.duplicates_removed += table.num_rows - rows.num_rows
            report.files_written.append(path)
            report.bytes_before += planned.file_bytes
            report.bytes_after += path.stat().st_size
    return report


def compact(
    data: Path,
    date: str,
    service: str | None = None,
    *,
    target_bytes: int = TARGET_BYTES,
    row_group_bytes: int = ROW_GROUP_BYTES,
    min_age_seconds: float = MIN_AGE_SECONDS,
    compression: str = "zstd",
    dry_run: bool = False,
    on_event: EventListener = ignore_event,
) -> CompactionReport:
    """Compact every ``service=`` partition of ``date`` (or ``service``'s) of the spans dataset under ``data``."""
    if target_bytes <= 0 or row_group_bytes <= 0 or min_age_seconds < 0:
        raise CompactionError("target and row group sizes must be positive, the minimum age not negative")
    report = CompactionReport(dry_run=dry_run)
    for directory in partition_directories(spans_table_root(data), date, service):
        report.absorb(
            compact_partition(
                directory,
                target_bytes=target_bytes,
                row_group_bytes=row_group_bytes,
                min_age_seconds=min_age_seconds,
                compression=compression,
                dry_run=dry_run,
                on_event=on_event,
            )
        )
    return report
