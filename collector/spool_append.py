"""Appending to the write-ahead spool: one writer's Arrow segments, each append one write and one fsync.

A writer appends to one segment at a time (``Spool.append``: the rows exported since the previous
flush, a group commit); a roll seals the segment (``seal``) and, once its rows are in durable Parquet
files (``mark_written``), the segment is deleted. See ``spool`` for the layout and the replay of
segments whose writer exited.

May import: tracelearn.collector.spool, tracelearn.storage, pyarrow.
"""

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracelearn.collector.spool import PARTITION_KEY, SegmentName, new_writer_id
from tracelearn.storage.atomic_files import Partition, fsync_directory, local_host

logger = logging.getLogger(__name__)

STREAM_BUFFER_BYTES = 1 << 16


class _StreamBytes:
    """The bytes an Arrow IPC stream writer produces, held until the next append takes them.

    The stream writer never touches the file: an append writes what it produced in one ``write``, so
    a failed write cannot leave the writer's state and the file disagreeing. (Arrow buffers in front
    of it, so this Python object sees a few large writes instead of one per column buffer.)
    """

    closed = False

    def __init__(self) -> None:
        self._chunks: list[Any] = []
        self._position = 0

    def write(self, data: Any) -> int:
        self._chunks.append(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = []
        return data


class SpoolSegment:
    """One segment file, open for appending; created empty (with its directory entry durable)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self._bytes = _StreamBytes()
        self._buffered = pa.BufferedOutputStream(pa.PythonFile(self._bytes, mode="w"), STREAM_BUFFER_BYTES)
        self._stream = pa.ipc.new_stream(self._buffered, schema)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fsync_directory(path.parent)
        except OSError:
            self.close()
            path.unlink(missing_ok=True)
            raise

    def append(self, batches: Iterable[tuple[Partition, pa.RecordBatch]]) -> None:
        """Append the batches and fsync. On ``OSError`` the file is cut back to its previous end."""
        for partition, batch in batches:
            self._stream.write_batch(batch, custom_metadata={PARTITION_KEY: json.dumps(partition).encode()})
        self._buffered.flush()
        data = memoryview(self._bytes.take())
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data) :]
            os.fsync(self._fd)
        except OSError:
            # Best effort: a torn tail is tolerated by replay anyway, but a clean file frees the space.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)
            raise

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class _Segment:
    name: SegmentName
    path: Path
    pending_rows: int = 0  # rows appended here and not yet in a durable Parquet file
    file: SpoolSegment | None = None


class Spool:
    """One writer's spool: appends go to the active segment; a segment is deleted when its rows are in Parquet.

    Not thread-safe: ``PartitionedParquetWriter`` serializes the calls.
    """

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = schema
        self.writer_id = new_writer_id()
        self._host = local_host()
        self._pid = os.getpid()
        self._sequence = 0
        self._active: _Segment | None = None
        self._segments: dict[SegmentName, _Segment] = {}

    def _next_name(self) -> SegmentName:
        self._sequence += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return SegmentName(stamp, self._host, self._pid, self.writer_id, self._sequence)

    def _open(self) -> _Segment:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = self._next_name()
        segment = _Segment(name, self.directory / name.file_name)
        segment.file = SpoolSegment(segment.path, self.schema)
        self._segments[name] = segment
        self._active = segment
        return segment

    def append(self, batches: Sequence[tuple[Partition, pa.RecordBatch]]) -> SegmentName:
        """Append and fsync; returns the segment that now holds the rows. Raises ``OSError`` (disk).

        A segment whose append failed is not appended to again (the next append opens a new one): it
        keeps only what earlier appends put there and is deleted once those rows are in Parquet.
        """
        segment = self._active or self._open()
        assert segment.file is not None, "the active segment is open"
        try:
            segment.file.append(batches)
        except BaseException:
            # Whatever failed, the stream writer's state and the file may now disagree.
            self._end_appends(segment)
            raise
        segment.pending_rows += sum(batch.num_rows for _, batch in batches)
        return segment.name

    def seal(self) -> SegmentName:
        """End appends to the active segment before a roll; returns the name the rolled files take.

        Rows rolled now that were never spooled go into the files of this name too: a replay of the
        segment finds the files there and skips them, which is right, since they hold its rows.
        """
        segment = self._active
        if segment is None:
            return self._next_name()
        self._end_appends(segment)
        return segment.name

    def mark_written(self, name: SegmentName, rows: int) -> None:
        """``rows`` of segment ``name`` are in a durable Parquet file."""
        segment = self._segments.get(name)
        if segment is not None:
            segment.pending_rows -= rows
            self._delete_if_done(segment)

    def close(self) -> None:
        """Close the open segment file; segments still holding rows stay on disk for replay."""
        if self._active is not None:
            self._end_appends(self._active)

    def _end_appends(self, segment: _Segment) -> None:
        if segment.file is not None:
            segment.file.close()
            segment.file = None
        if self._active is segment:
            self._active = None
        self._delete_if_done(segment)

    def _delete_if_done(self, segment: _Segment) -> None:
        if segment.pending_rows > 0 or segment is self._active:
            return
        del self._segments[segment.name]
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning(
                "tracelearn: cannot delete spool segment %s (%s); its rows are in Parquet already, "
                "so replaying it later writes nothing",
                segment.path,
                exc,
            )
