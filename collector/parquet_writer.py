"""Atomic, hive-partitioned Parquet files for one table, written by one process.

Rows are buffered per partition and written as one complete file when the buffer reaches the roll
size or age, or on ``flush()`` (end of a rollout, shutdown). A file is written under a dot-prefixed
temporary name, fsynced, renamed into place and its directory fsynced, so readers only ever see
complete files. File names carry host, pid and a per-writer random id, so several writers (processes)
sharing one dataset never clobber each other. Temporary files left by a killed writer are removed by
the next writer on the same host once their pid is gone.
"""

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.schemas.tables import TableSpec

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".parquet.tmp"
ROW_GROUP_ROWS = 1_000_000


UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def path_segment_safe(value: str) -> str:
    """``value`` usable as one path segment: a partition value like ``my/agent`` must not escape."""
    cleaned = UNSAFE_PATH_CHARS.sub("_", value)
    return cleaned if cleaned.strip(".") else "_"


class WriteError(OSError):
    """A file could not be written (unwritable directory, disk full); the rows stay buffered."""


@dataclass
class PartitionBuffer:
    batches: list[pa.RecordBatch]
    nbytes: int
    first_added: float


def fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_atomically(
    table: pa.Table, directory: Path, file_name: str, compression: str, row_group_rows: int = ROW_GROUP_ROWS
) -> Path:
    """Write ``table`` to ``directory/file_name`` so that the file appears complete or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / file_name
    temp = directory / f"{TEMP_PREFIX}{file_name.removesuffix('.parquet')}-{os.getpid()}{TEMP_SUFFIX}"
    try:
        with temp.open("wb") as handle:
            pq.write_table(
                table,
                handle,
                compression=None if compression == "none" else compression,
                row_group_size=row_group_rows,
            )
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(final)
        fsync_directory(directory)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_temp_files(directory: Path) -> int:
    """Delete temp files in ``directory`` whose writer pid (on this host) no longer runs."""
    removed = 0
    host = path_segment_safe(socket.gethostname())
    for temp in directory.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        stem = temp.name.removesuffix(TEMP_SUFFIX)
        pid_text = stem.rsplit("-", 1)[-1]
        if host in stem and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


class PartitionedParquetWriter:
    """Buffers record batches per hive partition and rolls them into atomic Parquet files.

    Thread-safe. ``write_files`` failures (disk full, permissions) keep the rows buffered for the next
    attempt and raise ``WriteError``; the caller decides how to report it.
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
        self.files_written: list[Path] = []
        self.rows_written = 0
        self._buffers: dict[tuple[str, ...], PartitionBuffer] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer_id = uuid.uuid4().hex[:8]
        self._host = path_segment_safe(socket.gethostname())
        self._sequence = 0
        self._cleaned: set[Path] = set()

    @property
    def buffered_rows(self) -> int:
        with self._lock:
            return sum(b.num_rows for buf in self._buffers.values() for b in buf.batches)

    def add(self, batches: Mapping[tuple[str, ...], pa.RecordBatch]) -> None:
        """Buffer one batch per partition (partition values in ``spec.partition_columns`` order)."""
        now = time.monotonic()
        with self._lock:
            for partition, batch in batches.items():
                if batch.num_rows == 0:
                    continue
                buffer = self._buffers.get(partition)
                if buffer is None:
                    self._buffers[partition] = PartitionBuffer([batch], batch.nbytes, now)
                else:
                    buffer.batches.append(batch)
                    buffer.nbytes += batch.nbytes

    def due_partitions(self) -> list[tuple[str, ...]]:
        """Partitions whose buffer reached the roll size or age."""
        now = time.monotonic()
        with self._lock:
            return [
                partition
                for partition, buffer in self._buffers.items()
                if buffer.nbytes >= self.roll_bytes or now - buffer.first_added >= self.roll_seconds
            ]

    def roll_due(self) -> list[Path]:
        """Write files for partitions due by size or age."""
        due = self.due_partitions()
        return self.write_files(due) if due else []

    def flush(self) -> list[Path]:
        """Write every buffered row to files now."""
        with self._lock:
            partitions = list(self._buffers)
        return self.write_files(partitions)

    def write_files(self, partitions: Sequence[tuple[str, ...]]) -> list[Path]:
        written = []
        with self._write_lock:
            for partition in partitions:
                with self._lock:
                    buffer = self._buffers.pop(partition, None)
                if buffer is None:
                    continue
                try:
                    written.append(self._write_partition(partition, buffer))
                except OSError as exc:
                    self._restore(partition, buffer)
                    raise WriteError(f"cannot write {self.spec.name} files under {self.root}: {exc}") from exc
        return written

    def _restore(self, partition: tuple[str, ...], buffer: PartitionBuffer) -> None:
        with self._lock:
            newer = self._buffers.get(partition)
            if newer is not None:
                buffer.batches.extend(newer.batches)
                buffer.nbytes += newer.nbytes
            self._buffers[partition] = buffer

    def _write_partition(self, partition: tuple[str, ...], buffer: PartitionBuffer) -> Path:
        directory = self.root.joinpath(
            *(f"{column}={value}" for column, value in zip(self.spec.partition_columns, partition, strict=True))
        )
        if directory not in self._cleaned and directory.is_dir():
            remove_abandoned_temp_files(directory)
            self._cleaned.add(directory)
        table = pa.Table.from_batches(buffer.batches, schema=self.spec.schema).replace_schema_metadata(
            self.spec.schema_with_metadata().metadata
        )
        self._sequence += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"part-{stamp}-{self._host}-{os.getpid()}-{self._writer_id}-{self._sequence:06d}.parquet"
        path = write_parquet_atomically(table, directory, name, self.compression)
        self.files_written.append(path)
        self.rows_written += table.num_rows
        return path
