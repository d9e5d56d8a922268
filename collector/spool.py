"""The write-ahead spool: rows on disk, fsynced, before they are rolled into Parquet files.

Owns the spool's files and their life: their names, appending (``spool_append``: the durability of
an acknowledged flush), deleting a segment once its rows are in Parquet, reading a segment back, and
replaying the segments of writers that exited without rolling (a ``kill -9``, a crash, a disk that
refused the final write). It does not buffer rows or
decide when to roll: ``PartitionedParquetWriter`` does, and writes the Parquet files from memory.

Layout: ``<root>/_spool/spool-<stamp>-<host>-<pid>-<writer id>-<sequence>.arrows`` (the leading
underscore keeps dataset readers out). A segment is one Arrow IPC stream: the table schema, then
record batches, each carrying its hive partition values in the batch's custom metadata. A writer
appends to one segment at a time, one ``write`` and one ``fsync`` per append: a group commit of
every row exported since the previous flush. A roll seals the segment and writes its rows as one
Parquet file per partition named after it, ``part-<stamp>-<host>-<pid>-<writer id>-<sequence>.parquet``;
once those are durable the segment is deleted.

Replay writes a dead writer's segment as those same file names, skipping names that already exist,
so a crash between "Parquet written" and "segment deleted" (in a roll or in a replay) never lands a
row twice, and two processes replaying one segment at once write the same files. A segment is read
up to its first incomplete or invalid message: what a kill tore off its tail was never acknowledged.
Rows repeated within a segment (a retried delivery) are kept once, by (trace_id, span_id).

Nothing acknowledged is dropped on the way: rows that cannot be written where they belong (a path
the filesystem refuses) and segments that cannot be read go to the quarantine (``quarantine``) with
their reason, and the replay goes on with the rest. ``replay_spools`` also replays the sidecar's
request logs (``request_log``, converted by ``conversion``), which live in the same directory.
"""

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from tracelearn.collector.quarantine import QUARANTINE_DIR, Quarantine, entry_name
from tracelearn.schemas.migrations import SchemaVersionError, migrate
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, TableSpec
from tracelearn.storage.atomic_files import (
    Partition,
    is_disk_error,
    local_host,
    partition_directory,
    path_segment_safe,
    process_gone,
    remove_abandoned_temp_files,
)
from tracelearn.storage.atomic_parquet import write_parquet_atomically

if TYPE_CHECKING:
    from tracelearn.collector.dedup import KeyIndex
    from tracelearn.collector.otlp_spans import DecodeLimits

logger = logging.getLogger(__name__)

SPOOL_DIR = "_spool"
SEGMENT_PREFIX = "spool-"
SEGMENT_SUFFIX = ".arrows"
# The sidecar's write-ahead request logs (``request_log``) share the directory and the naming.
REQUEST_LOG_PREFIX = "requests-"
REQUEST_LOG_SUFFIX = ".otlp"
DEFAULT_MAX_ATTRIBUTE_BYTES = 8 * 1024 * 1024
PARTITION_KEY = b"tracelearn.partition"
SPAN_KEY = ("trace_id", "span_id")

class SegmentFormatError(ValueError):
    """A file in the spool directory is not a segment this tracelearn can read (it goes to the quarantine)."""


# Writer ids created in this process: a segment with this process's pid but another writer id was
# left by an earlier process that had the same pid (a restarted container's agent is often pid 1).
_OWN_WRITER_IDS: set[str] = set()


@dataclass(frozen=True)
class SegmentName:
    """Who wrote a segment and when; also names the Parquet files its rows become."""

    stamp: str
    host: str
    pid: int
    writer_id: str
    sequence: int

    @property
    def stem(self) -> str:
        return f"{self.stamp}-{self.host}-{self.pid}-{self.writer_id}-{self.sequence:06d}"

    @property
    def file_name(self) -> str:
        return f"{SEGMENT_PREFIX}{self.stem}{SEGMENT_SUFFIX}"

    @property
    def parquet_name(self) -> str:
        """The file, in each partition directory, that holds this segment's rows of that partition."""
        return f"part-{self.stem}.parquet"

    @classmethod
    def parse(cls, file_name: str, prefix: str = SEGMENT_PREFIX, suffix: str = SEGMENT_SUFFIX) -> "SegmentName | None":
        """The name of a segment file, or ``None`` for anything else (host names may contain ``-``)."""
        if not (file_name.startswith(prefix) and file_name.endswith(suffix)):
            return None
        stamp, _, rest = file_name.removeprefix(prefix).removesuffix(suffix).partition("-")
        parts = rest.rsplit("-", 3)
        if len(parts) != 4 or not (parts[1].isdigit() and parts[3].isdigit()) or not parts[0]:
            return None
        host, pid, writer_id, sequence = parts
        return cls(stamp, host, int(pid), writer_id, int(sequence))


def pending_segments(spool: Path) -> list[Path]:
    """The segments in ``spool`` (a ``_spool`` directory) of both kinds: Arrow spools and request logs."""
    if not spool.is_dir():
        return []
    return sorted(
        path for path in spool.iterdir()
        if path.name.endswith((SEGMENT_SUFFIX, REQUEST_LOG_SUFFIX)) and path.name.startswith((SEGMENT_PREFIX,
                                                                                             REQUEST_LOG_PREFIX))
    )


def new_writer_id() -> str:
    """A random id for a new writer of this process (see ``writer_gone``)."""
    writer_id = uuid.uuid4().hex[:8]
    _OWN_WRITER_IDS.add(writer_id)
    return writer_id


def writer_gone(name: SegmentName) -> bool:
    """Whether the writer of segment ``name`` has exited; writers on other hosts cannot be checked."""
    if name.host != local_host():
        return False
    if name.pid == os.getpid():
        return name.writer_id not in _OWN_WRITER_IDS
    return process_gone(name.pid)


# --- Replay -----------------------------------------------------------------------------------------


@dataclass
class SegmentContents:
    """What a segment holds up to its first incomplete or invalid message."""

    schema: pa.Schema | None = None
    batches: dict[Partition, list[pa.RecordBatch]] = field(default_factory=dict)
    torn: bool = False


def _partition_of(metadata: Any, width: int) -> Partition:
    raw = (metadata or {}).get(PARTITION_KEY)
    values = json.loads(raw) if raw is not None else None
    if not isinstance(values, list) or len(values) != width or not all(isinstance(v, str) for v in values):
        raise ValueError(f"batch metadata {PARTITION_KEY.decode()}={raw!r} is not {width} partition values")
    # Written as path-safe already; cleaned again so that no file can steer a write out of the root.
    return tuple(path_segment_safe(v) for v in values)


def read_segment(path: Path, partition_width: int) -> SegmentContents:
    """Every complete, valid batch of the segment at ``path``, by partition, in append order."""
    contents = SegmentContents()
    with pa.OSFile(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except (ValueError, OSError):
            contents.torn = source.size() > 0  # empty: created, killed before its first append
            return contents
        contents.schema = reader.schema
        while True:
            try:
                batch, metadata = reader.read_next_batch_with_custom_metadata()
                batch.validate(full=True)
                partition = _partition_of(metadata, partition_width)
            except StopIteration:
                return contents
            except (ValueError, OSError):  # pa.ArrowInvalid is a ValueError
                contents.torn = True
                return contents
            contents.batches.setdefault(partition, []).append(batch)


def unique_rows(table: pa.Table, key: Sequence[str] = SPAN_KEY) -> pa.Table:
    """``table`` with the first row of each ``key`` value only, in the original order."""
    row = "__row"
    numbered = table.append_column(row, pa.array(range(table.num_rows), pa.int64()))
    first = numbered.group_by(list(key), use_threads=False).aggregate([(row, "min")]).column(f"{row}_min")
    if len(first) == table.num_rows:
        return table
    return table.take(pc.take(first, pc.sort_indices(first)))


def _schema_version(schema: pa.Schema, path: Path) -> int:
    raw = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if raw is None:
        raise SchemaVersionError(f"{path}: no {SCHEMA_VERSION_KEY.decode()} in the stream schema")
    return int(raw)


@dataclass
class ReplayReport:
    """What ``replay_spools`` (or the conversion of one segment) did."""

    segments: int = 0
    rows: int = 0
    duplicates: int = 0
    torn_tails: int = 0
    files: list[Path] = field(default_factory=list)
    quarantined_spans: int = 0  # acknowledged spans set aside with their reason (see ``quarantine``)
    quarantined_segments: int = 0  # segments (or their damaged rest) set aside whole
    keys: list[bytes] = field(default_factory=list)  # trace_id + span_id of the rows landed (when asked)
    truncated_values: int = 0
    request_logs: list[Path] = field(default_factory=list)  # exited writers' request logs left to the caller

    def add(self, other: "ReplayReport") -> None:
        self.segments += other.segments
        self.rows += other.rows
        self.duplicates += other.duplicates
        self.torn_tails += other.torn_tails
        self.files.extend(other.files)
        self.quarantined_spans += other.quarantined_spans
        self.quarantined_segments += other.quarantined_segments
        self.keys.extend(other.keys)
        self.truncated_values += other.truncated_values
        self.request_logs.extend(other.request_logs)


def table_keys(table: pa.Table) -> list[bytes]:
    """trace_id + span_id (16 + 8 bytes) of each row of a spans table."""
    return [
        bytes.fromhex(trace_id + span_id)
        for trace_id, span_id in zip(
            table.column("trace_id").to_pylist(), table.column("span_id").to_pylist(), strict=True
        )
    ]


def write_or_quarantine(
    table: pa.Table,
    directory: Path,
    file_name: str,
    compression: str,
    quarantine: Quarantine,
    entry: str,
    source: str,
) -> Path | None:
    """Write ``table`` atomically as ``directory/file_name``; when that one path refuses it, quarantine the rows.

    Returns the file, or ``None`` when the rows went to the quarantine. Raises ``OSError`` when the
    disk refuses writes (``is_disk_error``), or when the quarantine cannot take the rows either: the
    caller keeps its source and retries later.
    """
    try:
        if directory.is_dir():
            remove_abandoned_temp_files(directory)
        return write_parquet_atomically(table, directory, file_name, compression)
    except OSError as exc:
        if is_disk_error(exc):
            raise
        reason = f"cannot write {directory / file_name}: {exc}"
        if quarantine.rows(entry, table, compression, reason, source):
            logger.error("tracelearn: %d spans set aside in %s: %s", table.num_rows, quarantine.directory, reason)
        return None


def replay_segment(
    path: Path,
    name: SegmentName,
    root: Path,
    spec: TableSpec,
    compression: str,
    collect_keys: bool = False,
) -> ReplayReport:
    """Write the rows of one Arrow segment as Parquet files (those not there yet), then delete it.

    A partition whose rows cannot be migrated or written (a path the filesystem refuses) goes to the
    quarantine, and the other partitions go on. Raises ``SchemaVersionError`` for a segment this
    tracelearn cannot read as a whole (a newer version, no version), ``OSError`` when the disk
    refuses writes.
    """
    contents = read_segment(path, len(spec.partition_columns))
    report = ReplayReport(segments=1, torn_tails=int(contents.torn))
    quarantine = Quarantine(root)
    if contents.schema is not None:
        version = _schema_version(contents.schema, path)
        if version > spec.version:
            raise SchemaVersionError(
                f"{path}: {spec.name} schema version {version} is newer than this tracelearn reads ({spec.version}); "
                "upgrade tracelearn"
            )
        for partition, batches in contents.batches.items():
            directory = partition_directory(root, spec.partition_columns, partition)
            entry = entry_name(name.stem, *partition)
            if (directory / name.parquet_name).exists() or quarantine.holds(entry):
                continue  # written by the roll, or by an earlier replay of this segment
            raw = pa.Table.from_batches(batches, schema=contents.schema)
            try:
                table = unique_rows(migrate(raw, spec, version, str(path)))
            except (SchemaVersionError, pa.ArrowException, KeyError, ValueError) as exc:
                if quarantine.rows(entry, raw, compression, f"the rows do not fit the {spec.name} table: {exc}",
                                   str(path)):
                    report.quarantined_spans += raw.num_rows
                continue
            written = write_or_quarantine(table, directory, name.parquet_name, compression, quarantine, entry,
                                          str(path))
            if written is None:
                report.quarantined_spans += table.num_rows
                continue
            report.files.append(written)
            report.rows += table.num_rows
            report.duplicates += raw.num_rows - table.num_rows
            if collect_keys:
                report.keys += table_keys(table)
    path.unlink(missing_ok=True)
    return report


def replay_spools(
    root: Path,
    spec: TableSpec,
    compression: str,
    *,
    max_attribute_bytes: int = DEFAULT_MAX_ATTRIBUTE_BYTES,
    limits: "DecodeLimits | None" = None,
    collect_keys: bool = False,
    key_index: "KeyIndex | None" = None,
    request_logs: bool = True,
) -> ReplayReport:
    """Replay every segment under ``root/_spool`` whose writer (on this host) has exited.

    Both kinds: the in-process exporter's Arrow segments (``spool-*.arrows``) and the sidecar's
    request logs (``requests-*.otlp``, converted by ``conversion.convert_log_segment`` with
    ``max_attribute_bytes`` and the count ``limits``). Segments of live writers, and of other hosts
    (whose processes cannot be checked), are left alone; so is a segment of a newer schema version,
    logged, for a newer tracelearn. A segment that cannot be read at all is moved to the quarantine
    (``root/_quarantine``) with its reason, and the others go on. ``collect_keys``: report each
    landed row's key (for de-duplication). The keys of replayed request logs go to ``key_index``
    (by default the sidecar's, ``root/_spool/dedup-*.keys``), so that a collector started later
    recognizes retries of them. ``request_logs=False`` leaves the request logs to the caller (listed
    in ``request_logs``: a starting collector converts them while it serves). Raises ``OSError`` when
    the disk refuses writes; whatever was replayed before stays replayed.
    """
    report = ReplayReport()
    directory = root / SPOOL_DIR
    if not directory.is_dir():
        return report
    for path in sorted(directory.iterdir()):
        arrow_name = SegmentName.parse(path.name)
        log_name = SegmentName.parse(path.name, REQUEST_LOG_PREFIX, REQUEST_LOG_SUFFIX)
        name = arrow_name or log_name
        if name is None or not writer_gone(name):
            continue
        if arrow_name is None and not request_logs:
            report.request_logs.append(path)
            continue
        try:
            if arrow_name is not None:
                done = replay_segment(path, arrow_name, root, spec, compression, collect_keys)
            else:
                # Imported here: only a sidecar's segments need the OTLP decoder, an agent's exporter never does.
                from tracelearn.collector.conversion import convert_log_segment
                from tracelearn.collector.dedup import DEFAULT_DEDUP_WINDOW, KeyIndex

                key_index = key_index or KeyIndex(directory, DEFAULT_DEDUP_WINDOW)
                done = convert_log_segment(path, name, root, spec, compression, max_attribute_bytes, limits, key_index)
        except FileNotFoundError:
            continue  # another process replayed it meanwhile
        except SchemaVersionError as exc:
            if "newer than this tracelearn" in str(exc):
                logger.error("tracelearn: spool segment %s is not replayed: %s", path, exc)
                continue
            done = quarantine_segment(path, name, root, str(exc))
        except SegmentFormatError as exc:
            done = quarantine_segment(path, name, root, str(exc))
        except OSError as exc:
            if is_disk_error(exc):
                raise
            done = quarantine_segment(path, name, root, f"cannot be read: {exc}")
        except Exception as exc:  # a segment that breaks the reader must not stop the replay of the others
            logger.exception("tracelearn: spool segment %s cannot be replayed", path)
            done = quarantine_segment(path, name, root, f"cannot be replayed: {type(exc).__name__}: {exc}")
        report.add(done)
    return report


def quarantine_segment(path: Path, name: SegmentName, root: Path, reason: str) -> ReplayReport:
    """Move a segment that cannot be read to the quarantine; raises ``OSError`` if it cannot be moved."""
    Quarantine(root).segment(entry_name(name.stem, "segment"), path, reason, str(path))
    logger.error("tracelearn: spool segment %s set aside in %s: %s", path, root / QUARANTINE_DIR, reason)
    return ReplayReport(segments=1, quarantined_segments=1)
