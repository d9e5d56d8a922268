"""Hive-partitioned Parquet files for one table, written by one process behind a write-ahead spool.

Rows are buffered in memory per partition. ``spool_pending()`` (the end of a rollout) appends the
rows not yet spooled to this writer's spool segment and fsyncs it: from then on they survive a
crash. When a partition's buffer reaches the roll size or age, and on ``flush()`` (shutdown), every partition is
rolled: its rows are written from memory as atomic Parquet files named after the spool segment they
came from (see ``tracelearn.collector.spool``), and the segment is deleted once those files are
durable. Rolling all partitions together lets each roll retire the whole segment. A roll seals the
segment first and writes its files without holding up appends, which go on into a new segment.

File names carry host, pid and a per-writer random id, so several writers (processes) sharing one
dataset never clobber each other. Temp files left by a killed writer are removed by the next writer
on the same host once their pid is gone. Rows that one partition's path refuses (not the disk: a
name or a directory the filesystem will not take) go to the quarantine with the reason, so a bad
partition never blocks the others.
"""

import functools
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tracelearn.collector.quarantine import Quarantine, entry_name
from tracelearn.collector.spool import SPOOL_DIR, SegmentName, write_or_quarantine
from tracelearn.collector.spool_append import Spool
from tracelearn.schemas.tables import TableSpec
from tracelearn.storage.atomic_files import Partition, partition_directory


class WriteError(OSError):
    """A file could not be written (unwritable directory, disk full); the rows stay buffered."""


@dataclass(slots=True)
class BufferedBatch:
    """A batch waiting for its roll, and the spool segment holding it (``None`` until spooled)."""

    batch: pa.RecordBatch
    segment: SegmentName | None = None


@dataclass
class PartitionBuffer:
    batches: list[BufferedBatch]
    nbytes: int
    first_added: float


def batches_by_file(
    batches: Sequence[BufferedBatch], seal: SegmentName
) -> list[tuple[SegmentName, list[BufferedBatch]]]:
    """A partition's batches grouped by the file they roll into: the one named after their segment.

    Batches never spooled join the file of ``seal`` (the segment this roll sealed). Normally there
    is one group; more only after a failed append or write left rows of an older segment behind.
    """
    groups: dict[SegmentName, list[BufferedBatch]] = {}
    for buffered in batches:
        groups.setdefault(buffered.segment or seal, []).append(buffered)
    return list(groups.items())


def _forget_parent_rows(writer_ref: "weakref.ref[PartitionedParquetWriter]") -> None:
    writer = writer_ref()
    if writer is not None:
        writer.forget_parent_rows()


class PartitionedParquetWriter:
    """Buffers record batches per hive partition, spools them on demand, rolls them into Parquet files.

    Thread-safe. Failures to append or write (disk full, permissions) keep the rows buffered for the
    next attempt and raise ``WriteError``; the caller decides how to report it.
    """

    def __init__(
        self,
        root: Path,
        spec: TableSpec,
        roll_bytes: int = 64 * 1024 * 1024,
        roll_seconds: float = 60.0,
        compression: str = "zstd",
    ) -> None:
        self.root = root
        self.spec = spec
        self.roll_bytes = roll_bytes
        self.roll_seconds = roll_seconds
        self.compression = compression
        self.rows_written = 0
        self._buffers: dict[Partition, PartitionBuffer] = {}
        # The buffered batches not in the spool yet, oldest first: a flush appends them without
        # scanning every buffered batch (a buffer holds all exports since the last roll).
        self._unspooled: list[tuple[Partition, BufferedBatch]] = []
        self._lock = threading.Lock()  # the buffers
        self._write_lock = threading.Lock()  # the spool: one append, seal or segment deletion at a time
        self._roll_lock = threading.Lock()  # the files: one roll at a time
        self._spool = Spool(root / SPOOL_DIR, spec.schema_with_metadata())
        self._quarantine = Quarantine(root)
        os.register_at_fork(after_in_child=functools.partial(_forget_parent_rows, weakref.ref(self)))

    def forget_parent_rows(self) -> None:
        """In a forked child: drop the rows and the spool segment inherited from the parent.

        The parent still owns them; a child that kept them would write them a second time.
        """
        self._spool.close()  # the child's copy of the file descriptor; the parent's stays open
        self._spool = Spool(self._spool.directory, self._spool.schema)
        self._buffers = {}
        self._unspooled = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._roll_lock = threading.Lock()

    @property
    def spool_directory(self) -> Path:
        return self._spool.directory

    @property
    def buffered_rows(self) -> int:
        with self._lock:
            return sum(b.batch.num_rows for buf in self._buffers.values() for b in buf.batches)

    @property
    def unspooled_rows(self) -> int:
        """Buffered rows in no spool segment: the ones a crash now would lose."""
        with self._lock:
            return sum(buffered.batch.num_rows for _, buffered in self._unspooled)

    def add(self, batches: Mapping[Partition, pa.RecordBatch]) -> None:
        """Buffer one batch per partition (partition values in ``spec.partition_columns`` order)."""
        with self._lock:
            for partition, batch in batches.items():
                if batch.num_rows:
                    buffered = BufferedBatch(batch)
                    self._unspooled.append((partition, buffered))
                    self._buffer(partition, buffered)

    def _buffer(self, partition: Partition, buffered: BufferedBatch) -> None:
        # Not ``batch.nbytes``, which walks every value of nested columns (~60 µs a batch).
        nbytes = buffered.batch.get_total_buffer_size()
        buffer = self._buffers.get(partition)
        if buffer is None:
            self._buffers[partition] = PartitionBuffer([buffered], nbytes, time.monotonic())
        else:
            buffer.batches.append(buffered)
            buffer.nbytes += nbytes

    def roll_is_due(self) -> bool:
        """Whether some partition's buffer reached the roll size or age."""
        now = time.monotonic()
        with self._lock:
            return any(
                buffer.nbytes >= self.roll_bytes or now - buffer.first_added >= self.roll_seconds
                for buffer in self._buffers.values()
            )

    def roll_due(self) -> list[Path]:
        """Roll every partition if one of them is due by size or age."""
        return self.flush() if self.roll_is_due() else []

    def spool_pending(self) -> int:
        """Append the buffered rows not yet spooled to the spool, fsynced; returns how many rows."""
        with self._write_lock:
            with self._lock:
                pending, self._unspooled = self._unspooled, []
            if not pending:
                return 0
            try:
                segment = self._spool.append([(partition, buffered.batch) for partition, buffered in pending])
            except BaseException as exc:
                with self._lock:
                    self._unspooled[:0] = pending
                if isinstance(exc, OSError):
                    raise WriteError(f"cannot append to the spool under {self._spool.directory}: {exc}") from exc
                raise
            with self._lock:
                for _, buffered in pending:
                    buffered.segment = segment
            return sum(buffered.batch.num_rows for _, buffered in pending)

    def flush(self) -> list[Path]:
        """Roll now: write every buffered row into Parquet files and retire their spool segments."""
        written: list[Path] = []
        with self._roll_lock:
            with self._write_lock:
                with self._lock:
                    buffers, self._buffers = self._buffers, {}
                    self._unspooled = []  # all of them are in ``buffers``, going to Parquet now
                if not buffers:
                    return written
                seal = self._spool.seal()
            # The files are written outside the write lock: appends meanwhile go into a new segment.
            pending = list(buffers.items())
            for index, (partition, buffer) in enumerate(pending):
                groups = batches_by_file(buffer.batches, seal)
                for done, (name, batches) in enumerate(groups):
                    try:
                        path = self._write_file(partition, name, batches)
                    except OSError as exc:
                        buffer.batches = [b for _, group in groups[done:] for b in group]
                        self._restore(pending[index:])
                        raise WriteError(f"cannot write {self.spec.name} files under {self.root}: {exc}") from exc
                    if path is not None:
                        written.append(path)
                    with self._write_lock:
                        self._spool.mark_written(name, sum(b.batch.num_rows for b in batches if b.segment == name))
        return written

    def close(self) -> None:
        """Close the spool file; segments whose rows are not in Parquet stay on disk for replay."""
        with self._write_lock:
            self._spool.close()

    def _restore(self, unwritten: Sequence[tuple[Partition, PartitionBuffer]]) -> None:
        """Put rows a roll could not write back in front of anything buffered since."""
        with self._lock:
            self._unspooled[:0] = [(p, b) for p, buffer in unwritten for b in buffer.batches if b.segment is None]
            for partition, buffer in unwritten:
                newer = self._buffers.get(partition)
                if newer is not None:
                    buffer.batches.extend(newer.batches)
                buffer.nbytes = sum(b.batch.get_total_buffer_size() for b in buffer.batches)
                self._buffers[partition] = buffer

    def _write_file(self, partition: Partition, name: SegmentName, batches: Sequence[BufferedBatch]) -> Path | None:
        """Write one partition's rows; ``None`` when that partition's path refused them and they were quarantined."""
        directory = partition_directory(self.root, self.spec.partition_columns, partition)
        # One batch per flush (a rollout's spans) makes many small chunks; Parquet writes one large
        # chunk per column about twice as fast, which outweighs the copy.
        table = (
            pa.Table.from_batches([b.batch for b in batches], schema=self.spec.schema)
            .combine_chunks()
            .replace_schema_metadata(self.spec.schema_with_metadata().metadata)
        )
        entry = entry_name(name.stem, *partition)
        path = write_or_quarantine(table, directory, name.parquet_name, self.compression, self._quarantine, entry,
                                   str(self._spool.directory / name.file_name))
        if path is not None:
            self.rows_written += table.num_rows
        return path
