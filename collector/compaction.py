"""Compaction: the small files of a spans partition merged into a few files with large row groups.

Owns the work of ``tracelearn spans compact`` on one ``date=D/service=S`` directory: choosing the
inputs, writing the merged files, the lock and journal files of a compaction, and finishing or
rolling back a compaction a crash interrupted. May import tracelearn.schemas, the collector's
atomic_files and spool modules, and pyarrow; never polars, torch or airflow.

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

import contextlib
import datetime as dt
import enum
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.collector.atomic_files import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    AtomicParquetWriter,
    fsync_directory,
    local_host,
    path_segment_safe,
    process_gone,
)
from tracelearn.collector.spool import (
    REQUEST_LOG_PREFIX,
    REQUEST_LOG_SUFFIX,
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    SPAN_KEY,
    SPOOL_DIR,
    SegmentName,
    unique_rows,
)
from tracelearn.schemas.dataset import DatasetError, file_schema_version
from tracelearn.schemas.migrations import MIGRATIONS, SchemaVersionError, migrate
from tracelearn.schemas.tables import SPANS

MIB = 1024 * 1024
TARGET_BYTES = 128 * MIB
ROW_GROUP_BYTES = 128 * MIB
MIN_AGE_SECONDS = 60.0

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
LOCK_NAME = "_compaction.lock"
JOURNAL_PREFIX = "_compaction-"
JOURNAL_SUFFIX = ".json"
JOURNAL_FORMAT = 1
WRITER_ID_PREFIX = "compact"
# Journal temps and the stale locks being taken over: a dot prefix like every temp file, and a name
# of their own, so nothing but compaction ever matches them.
COMPACTION_TEMP_PREFIX = f"{TEMP_PREFIX}compaction-"
PLANNED_BYTES_KEY = b"tracelearn.compaction.planned_bytes"
SORT_KEYS = [("trace_id", "ascending"), ("start_time", "ascending"), ("span_id", "ascending")]
DATE_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")

# Lock tokens held in this process: a lock naming this pid but another token was left by an earlier
# process that had the same pid (a restarted container's command is often pid 1).
_HELD_TOKENS: set[str] = set()


class CompactionError(Exception):
    """Compaction cannot run as asked (no such data, a bad date, a broken journal)."""


class CompactionLockedError(CompactionError):
    """Another compaction of the partition holds its lock."""


class CompactionConflictError(CompactionError):
    """Someone else changed the partition's inputs or lock during the run; that output was rolled back."""


class Step(enum.StrEnum):
    """The points of a run that ``on_event`` hears about, in the order they happen per output."""

    PLANNED = "planned"  # path: the partition; nbytes: what the run will read there
    INPUT_READ = "input read"  # path: the input; nbytes: its size on disk
    OUTPUT_WRITTEN = "output written"  # path: the temp file, every row in it, not yet renamed
    JOURNAL_WRITTEN = "journal written"  # path: the journal
    OUTPUT_RENAMED = "output renamed"  # path: the output, now visible next to its inputs
    INPUT_DELETED = "input deleted"  # path: the deleted input


@dataclass(frozen=True)
class CompactionEvent:
    step: Step
    path: Path
    nbytes: int = 0


EventListener = Callable[[CompactionEvent], None]


def _ignore(event: CompactionEvent) -> None:
    return None


@dataclass(frozen=True)
class InputFile:
    """A finished file chosen for merging."""

    path: Path
    file_bytes: int  # on disk
    planned_bytes: int  # uncompressed estimate, or the size a compaction planned the file at
    rows: int
    version: int


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class PlannedOutput:
    inputs: tuple[InputFile, ...]

    @property
    def planned_bytes(self) -> int:
        return sum(item.planned_bytes for item in self.inputs)

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.inputs)

    @property
    def file_bytes(self) -> int:
        return sum(item.file_bytes for item in self.inputs)


@dataclass(frozen=True)
class PartitionPlan:
    directory: Path
    outputs: tuple[PlannedOutput, ...]
    skipped: tuple[SkippedFile, ...]


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


# --- Choosing the inputs ----------------------------------------------------------------------------


def migration_path_exists(version: int) -> bool:
    """Whether registered migrations lift spans files of ``version`` to the current version."""
    return all((SPANS.name, step) in MIGRATIONS for step in range(version, SPANS.version))


def planned_size(metadata: pq.FileMetaData) -> int:
    """A file's size for packing: what a compaction planned it at, else its uncompressed row groups."""
    recorded = (metadata.metadata or {}).get(PLANNED_BYTES_KEY)
    if recorded is not None and recorded.isdigit():
        return int(recorded)
    return sum(metadata.row_group(index).total_byte_size for index in range(metadata.num_row_groups))


def inspect_file(
    path: Path, now: float, min_age_seconds: float, target_bytes: int, spool: Path
) -> InputFile | SkippedFile:
    """``path`` as an input, or why it is left alone."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return SkippedFile(path, "deleted while the partition was being listed")
    age = now - stat.st_mtime
    if age < min_age_seconds:
        return SkippedFile(path, f"modified {age:.0f} s ago, less than --min-age-seconds {min_age_seconds:g}")
    # A sidecar's conversion batches after the first are named part-<stem>+<n>.parquet.
    stem = path.name.removeprefix(PART_PREFIX).removesuffix(PART_SUFFIX).partition("+")[0]
    if (spool / f"{SEGMENT_PREFIX}{stem}{SEGMENT_SUFFIX}").exists() or (
        spool / f"{REQUEST_LOG_PREFIX}{stem}{REQUEST_LOG_SUFFIX}"
    ).exists():
        return SkippedFile(path, "its spool segment is still pending (a replay would write this file again)")
    try:
        version = file_schema_version(path, SPANS)
        metadata = pq.read_metadata(path)
    except (DatasetError, SchemaVersionError, OSError, pa.ArrowInvalid) as exc:
        return SkippedFile(path, str(exc).removeprefix(f"{path}: "))
    if version > SPANS.version:
        return SkippedFile(path, f"schema version {version} is newer than this tracelearn's ({SPANS.version})")
    if version < SPANS.version and not migration_path_exists(version):
        return SkippedFile(path, f"schema version {version} has no migration to version {SPANS.version}")
    if version == SPANS.version and not metadata.schema.to_arrow_schema().equals(SPANS.schema, check_metadata=False):
        return SkippedFile(path, f"its columns are not those of spans schema version {SPANS.version}")
    planned = planned_size(metadata)
    if planned >= target_bytes:
        return SkippedFile(path, f"already {planned / MIB:.1f} MiB, at or above the target")
    return InputFile(path, stat.st_size, planned, metadata.num_rows, version)


def pack_first_fit(inputs: Sequence[InputFile], target_bytes: int) -> list[list[InputFile]]:
    """Groups of at most ``target_bytes``, each input in the first group it fits, inputs kept in order.

    First-fit (not next-fit): an input opens a group only when it fits in none, so no two final
    groups fit together, whatever the order of the next run's listing.
    """
    groups: list[list[InputFile]] = []
    sizes: list[int] = []
    for item in inputs:
        for index, size in enumerate(sizes):
            if size + item.planned_bytes <= target_bytes:
                groups[index].append(item)
                sizes[index] += item.planned_bytes
                break
        else:
            groups.append([item])
            sizes.append(item.planned_bytes)
    return groups


def plan_partition(directory: Path, target_bytes: int, min_age_seconds: float) -> PartitionPlan:
    """Which files of the partition ``directory`` merge into which outputs, and which stay, and why."""
    now = time.time()
    spool = directory.parent.parent / SPOOL_DIR
    inputs: list[InputFile] = []
    skipped: list[SkippedFile] = []
    for path in sorted(directory.glob(f"*{PART_SUFFIX}")):
        if path.name.startswith((".", "_")):
            continue  # invisible to readers, not ours to merge
        checked = (
            inspect_file(path, now, min_age_seconds, target_bytes, spool)
            if path.name.startswith(PART_PREFIX)
            else SkippedFile(path, "not a tracelearn part-*.parquet file")
        )
        if isinstance(checked, InputFile):
            inputs.append(checked)
        else:
            skipped.append(checked)
    outputs = []
    for group in pack_first_fit(inputs, target_bytes):
        if len(group) == 1:
            skipped.append(SkippedFile(group[0].path, "no other small file fits with it"))
        else:
            outputs.append(PlannedOutput(tuple(group)))
    return PartitionPlan(directory, tuple(outputs), tuple(sorted(skipped, key=lambda s: s.path)))


# --- The lock ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    token: str
    since: str


def read_lock(path: Path) -> LockHolder | None:
    """Who holds the lock at ``path`` (``None``: nobody); raises ``CompactionLockedError`` when it names no one.

    A lock without a readable holder is being written right now (O_EXCL creates it empty), or was
    left so by a crash in that instant: only a person can tell which.
    """
    try:
        fields = json.loads(path.read_text())
        return LockHolder(str(fields["host"]), int(fields["pid"]), str(fields["token"]), str(fields["since"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        if path.exists():
            raise CompactionLockedError(
                f"{path}: lock file without a readable holder (being taken right now, or left empty by a crash); "
                "if no compaction of this partition runs, delete it"
            ) from None
        return None


def lock_is_stale(holder: LockHolder) -> bool:
    """Whether the holder has exited; a holder on another host cannot be checked, so it is not stale."""
    if holder.host != local_host():
        return False
    if holder.pid == os.getpid():
        return holder.token not in _HELD_TOKENS
    return process_gone(holder.pid)


def locked_message(path: Path, holder: LockHolder) -> str:
    if holder.host == local_host():
        return (
            f"{path}: a compaction of this partition is running (pid {holder.pid}, since {holder.since}); wait for it"
        )
    return (
        f"{path}: held by pid {holder.pid} on host {holder.host} since {holder.since}, which this host cannot check; "
        "if no compaction runs there, delete the lock file"
    )


def _create_lock(path: Path, ours: LockHolder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"host": ours.host, "pid": ours.pid, "token": ours.token, "since": ours.since}, handle)
    return True


def _take_over_stale(path: Path, stale: LockHolder, ours: LockHolder) -> None:
    """Remove the lock if it is still ``stale``'s; a lock taken meanwhile by a live process stays."""
    aside = path.parent / f"{COMPACTION_TEMP_PREFIX}stale-lock-{ours.token}"
    try:
        path.rename(aside)  # exactly one process moves a given lock file away
    except FileNotFoundError:
        return
    try:
        moved = read_lock(aside)
        still_stale = moved is None or moved.token == stale.token
    except CompactionLockedError:  # a lock being written by the process that just created it
        moved, still_stale = None, False
    if not still_stale:
        # Another process took the lock between our read and our rename: give it back.
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        raise CompactionLockedError(
            locked_message(path, moved) if moved else f"{path}: just taken by another compaction"
        )
    aside.unlink(missing_ok=True)


def acquire_lock(directory: Path) -> LockHolder:
    """Hold the partition's lock, taking over one whose process on this host is gone."""
    path = directory / LOCK_NAME
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    ours = LockHolder(local_host(), os.getpid(), uuid.uuid4().hex, now)
    for _ in range(3):  # another try only after a stale lock was removed
        if _create_lock(path, ours):
            _HELD_TOKENS.add(ours.token)
            return ours
        holder = read_lock(path)
        if holder is None:
            continue  # released meanwhile
        if not lock_is_stale(holder):
            raise CompactionLockedError(locked_message(path, holder))
        _take_over_stale(path, holder, ours)
    raise CompactionLockedError(f"{path}: the lock keeps changing hands; try again")


def lock_still_held(directory: Path, ours: LockHolder) -> bool:
    holder = read_lock(directory / LOCK_NAME)
    return holder is not None and holder.token == ours.token


def release_lock(directory: Path, ours: LockHolder) -> None:
    """Delete the lock if it is still ours."""
    _HELD_TOKENS.discard(ours.token)
    with contextlib.suppress(CompactionLockedError):
        if lock_still_held(directory, ours):
            (directory / LOCK_NAME).unlink(missing_ok=True)


@contextlib.contextmanager
def partition_lock(directory: Path) -> Iterator[LockHolder]:
    ours = acquire_lock(directory)
    try:
        yield ours
    finally:
        release_lock(directory, ours)


# --- Journals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Journal:
    """One output's commit record: while it exists, ``output`` may be visible next to ``inputs``."""

    path: Path
    output: str
    inputs: tuple[str, ...]


def write_journal(path: Path, output: str, inputs: Sequence[Path]) -> None:
    """Write the journal ``path`` atomically (temp, fsync, rename, directory fsync)."""
    payload = {
        "format": JOURNAL_FORMAT,
        "output": output,
        "inputs": [item.name for item in inputs],
        "host": local_host(),
        "pid": os.getpid(),
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    temp = path.parent / f"{COMPACTION_TEMP_PREFIX}{path.name}.tmp"
    try:
        with temp.open("w") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
        fsync_directory(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def read_journals(directory: Path) -> list[Journal]:
    """The journals in ``directory``; raises ``CompactionError`` naming one that cannot be understood."""
    journals = []
    for path in sorted(directory.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}")):
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # its compaction just finished
        except ValueError as exc:
            raise CompactionError(f"{path}: not a compaction journal ({exc}); nothing was changed") from None
        names = _journal_names(payload)
        if names is None:
            raise CompactionError(f"{path}: not a compaction journal of format {JOURNAL_FORMAT}; nothing was changed")
        output, inputs = names
        for name in [output, *inputs]:
            if Path(name).name != name or not name.startswith(PART_PREFIX):
                raise CompactionError(f"{path}: names {name!r}, not a part file of this directory")
        journals.append(Journal(path, output, inputs))
    return journals


def _journal_names(payload: object) -> tuple[str, tuple[str, ...]] | None:
    """(output, inputs) of a parsed journal, ``None`` when it is not one of this format."""
    if not isinstance(payload, dict) or payload.get("format") != JOURNAL_FORMAT:
        return None
    output, inputs = payload.get("output"), payload.get("inputs")
    if not isinstance(output, str) or not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        return None
    return output, tuple(inputs)


def superseded_inputs(directory: Path, listed: Collection[str]) -> set[str]:
    """Names in ``listed`` (one listing of ``directory``) whose rows a listed compaction output holds.

    For a reader that does not de-duplicate: list the directory, drop these names, read the rest. An
    input is dropped only when its output is in the same listing; if the journal is gone by the time
    it is read, its inputs are gone too, and opening one raises ``FileNotFoundError``: list again.
    """
    present = set(listed)
    superseded = {name for journal in read_journals(directory) if journal.output in present for name in journal.inputs}
    return superseded & present


def _delete_inputs(directory: Path, names: Sequence[str], on_event: EventListener) -> None:
    for name in names:
        path = directory / name
        path.unlink(missing_ok=True)
        on_event(CompactionEvent(Step.INPUT_DELETED, path))
    fsync_directory(directory)


def _output_temp_files(directory: Path, output: str | None = None) -> list[Path]:
    """Temp files of compaction outputs (of ``output`` only, if given)."""
    stem = output.removesuffix(PART_SUFFIX) if output else f"{PART_PREFIX}*-{WRITER_ID_PREFIX}*"
    return sorted(directory.glob(f"{TEMP_PREFIX}{stem}-*{TEMP_SUFFIX}"))


def recover_partition(directory: Path) -> list[str]:
    """Finish (output present) or roll back (output absent) every journal; call with the lock held.

    Also deletes the temp files of compactions that died before writing a journal: with the lock
    held, no other compaction of this partition is running. Returns what was done, one line each.
    """
    done = []
    for journal in read_journals(directory):
        if (directory / journal.output).exists():
            remaining = [name for name in journal.inputs if (directory / name).exists()]
            _delete_inputs(directory, remaining, _ignore)
            done.append(f"finished {journal.output}: deleted {len(remaining)} remaining inputs")
        else:
            for temp in _output_temp_files(directory, journal.output):
                temp.unlink(missing_ok=True)
            done.append(f"rolled back {journal.output}: its {len(journal.inputs)} inputs stay")
        journal.path.unlink(missing_ok=True)
        fsync_directory(directory)
    leftovers = _output_temp_files(directory) + sorted(directory.glob(f"{COMPACTION_TEMP_PREFIX}{JOURNAL_PREFIX}*"))
    for temp in leftovers:
        temp.unlink(missing_ok=True)
        done.append(f"deleted {temp.name}, left by an interrupted compaction")
    return done


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
    _delete_inputs(directory, [path.name for path in inputs], on_event)
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
    on_event: EventListener = _ignore,
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
    on_event: EventListener = _ignore,
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
