"""The sidecar's write-ahead request log: acknowledged OTLP request bodies on disk, fsynced, before conversion.

The sidecar acknowledges a request once its body is here; ``conversion`` turns a sealed segment into
Parquet files afterwards, off the request path. So the log holds request bodies as they arrived
(decompressed), not rows: memory on the request path follows wire bytes, and a span that cannot be
converted is quarantined later instead of failing a request that was already answered.

Layout: ``<spans root>/_spool/requests-<stamp>-<host>-<pid>-<writer id>-<sequence>.otlp`` (the same
naming as the in-process exporter's Arrow segments, ``spool``, so the same replay rules apply: a
segment is replayed once its writer has exited). A segment starts with ``MAGIC``, a version and the
size of the conversion batches (``chunk_bytes``), fixed when the segment is created so that a
replay cuts the same batches (and names the same files) as the first conversion did. Then records::

    length u32 | crc32 u32 | media u8, pad 3 | spans u32 | skipped u32 | expanded_bytes u64
    | skipped positions u32... | body

``skipped`` lists the positions (request order) of spans that are not to become rows: rejected by
validation or dropped as duplicates at the commit; ``expanded_bytes`` estimates the rows' size. One
group commit is one ``write`` and one ``fsync``. A record cut off at the end of a segment is a write
that was never acknowledged (a kill, a power cut) and is ignored; a record that fails its checksum
with more records after it is damage, reported so that the rest can be quarantined.

May import: tracelearn.collector.spool, tracelearn.storage, the standard library.
"""

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tracelearn.collector.otlp_decode import JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE
from tracelearn.collector.otlp_wire import Body
from tracelearn.collector.spool import (
    REQUEST_LOG_PREFIX,
    REQUEST_LOG_SUFFIX,
    SegmentFormatError,
    SegmentName,
    new_writer_id,
)
from tracelearn.storage.atomic_files import fsync_directory, local_host

logger = logging.getLogger(__name__)

MAGIC = b"TLREQLOG"
VERSION = 1
_HEADER = struct.Struct("<8sIQ")  # magic, version, chunk_bytes
_RECORD = struct.Struct("<II")  # payload length, crc32 of the payload
_PAYLOAD = struct.Struct("<B3xIIQ")  # media, spans, skipped, expanded_bytes
MEDIA_TYPES = (PROTOBUF_CONTENT_TYPE, JSON_CONTENT_TYPE)
# A record longer than this is damage, not a request (bodies are at most --max-body-bytes).
MAX_RECORD_BYTES = 1 << 31


class LogFormatError(SegmentFormatError):
    """A segment does not start with a request log header."""


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One acknowledged request: its body and which of its spans become rows."""

    media_type: str
    spans: int
    skipped: tuple[int, ...]
    expanded_bytes: int
    body: Body

    def encoded(self) -> list[Body]:
        """The record as buffers to write one after the other (the body is not copied)."""
        skipped = struct.pack(f"<{len(self.skipped)}I", *self.skipped)
        payload_header = _PAYLOAD.pack(MEDIA_TYPES.index(self.media_type), self.spans, len(self.skipped),
                                       self.expanded_bytes)
        crc = zlib.crc32(self.body, zlib.crc32(skipped, zlib.crc32(payload_header)))
        length = _PAYLOAD.size + len(skipped) + len(self.body)
        return [_RECORD.pack(length, crc) + payload_header + skipped, self.body]


def log_file_name(name: SegmentName) -> str:
    return f"{REQUEST_LOG_PREFIX}{name.stem}{REQUEST_LOG_SUFFIX}"


def log_segment_name(file_name: str) -> SegmentName | None:
    """The name of a request log segment, or ``None`` for any other file."""
    return SegmentName.parse(file_name, REQUEST_LOG_PREFIX, REQUEST_LOG_SUFFIX)


@dataclass
class _Active:
    path: Path
    fd: int
    started: float
    expanded_bytes: int = 0


class RequestLog:
    """One writer's request log. Not thread-safe: the group committer is its only user.

    ``append`` writes records to the active segment (created on demand); ``seal`` ends it, and the
    sealed segments wait in ``take_sealed`` for conversion. A segment whose append failed is sealed
    at once: it keeps what earlier appends put there, and later appends go to a new one.
    """

    def __init__(self, directory: Path, chunk_bytes: int) -> None:
        self.directory = directory
        self.chunk_bytes = chunk_bytes
        self.writer_id = new_writer_id()
        self._host = local_host()
        self._sequence = 0
        self._active: _Active | None = None
        self._sealed: list[Path] = []

    @property
    def active_expanded_bytes(self) -> int:
        return self._active.expanded_bytes if self._active is not None else 0

    @property
    def active_age(self) -> float:
        """Seconds since the active segment's first append (0 without one)."""
        return time.monotonic() - self._active.started if self._active is not None else 0.0

    def _open(self) -> _Active:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = SegmentName(stamp, self._host, os.getpid(), self.writer_id, self._sequence)
        path = self.directory / log_file_name(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, _HEADER.pack(MAGIC, VERSION, self.chunk_bytes))
            os.fsync(fd)
            fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return _Active(path, fd, time.monotonic())

    def append(self, records: Sequence[LoggedRequest]) -> None:
        """Append ``records`` in one write and fsync; raises ``OSError`` (the file is cut back, and sealed)."""
        if not records:
            return
        if self._active is None:
            self._active = self._open()
        active = self._active
        buffers = [buffer for record in records for buffer in record.encoded()]
        end = os.lseek(active.fd, 0, os.SEEK_END)
        try:
            _writev_all(active.fd, buffers)
            os.fsync(active.fd)
        except OSError:
            # Best effort: a torn tail is ignored by the reader anyway, but a clean file frees the space.
            with contextlib.suppress(OSError):
                os.ftruncate(active.fd, end)
            self.seal()
            raise
        active.expanded_bytes += sum(record.expanded_bytes for record in records)

    def seal(self) -> None:
        """End appends to the active segment; it waits in ``take_sealed`` for conversion."""
        active, self._active = self._active, None
        if active is None:
            return
        with contextlib.suppress(OSError):
            os.close(active.fd)
        self._sealed.append(active.path)

    def take_sealed(self) -> list[Path]:
        """The segments sealed since the last call, oldest first."""
        sealed, self._sealed = self._sealed, []
        return sealed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# At most this many buffers per writev call (POSIX guarantees IOV_MAX >= 16; Linux has 1024).
_WRITEV_BUFFERS = 512


def _writev_all(fd: int, buffers: list[Body]) -> None:
    """Write ``buffers`` one after the other without joining them (a group commit's bodies stay where they are)."""
    views = [memoryview(buffer) for buffer in buffers if buffer]
    while views:
        written = os.writev(fd, views[:_WRITEV_BUFFERS])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


@dataclass
class LogRecord:
    """A record read back: the request and where it starts in the segment."""

    request: LoggedRequest
    offset: int


class LogReader:
    """The records of one segment, in order, up to its end or its first bad record.

    After iterating: ``torn`` says a cut-off last record was ignored (never acknowledged);
    ``damaged_at`` is the offset of a record that failed its checksum with data after it (the bytes
    from there on cannot be trusted and go to the quarantine), else ``None``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn = False
        self.damaged_at: int | None = None
        self.size = path.stat().st_size
        self.chunk_bytes = 0

    def read_header(self, handle: BinaryIO) -> bool:
        """Read the segment header; ``False`` for a segment cut off before it (created, never appended)."""
        raw = handle.read(_HEADER.size)
        if len(raw) < _HEADER.size and raw[: len(MAGIC)] == MAGIC[: len(raw)]:
            self.torn = bool(raw)  # cut off while being created: nothing was ever appended
            return False
        magic, version, chunk_bytes = _HEADER.unpack(raw) if len(raw) == _HEADER.size else (raw, 0, 0)
        if magic != MAGIC or version != VERSION or chunk_bytes <= 0:
            raise LogFormatError(f"{self.path}: not a version {VERSION} request log (header {raw[:12]!r})")
        self.chunk_bytes = chunk_bytes
        return True

    def records(self) -> Iterator[LogRecord]:
        with self.path.open("rb") as handle:
            if not self.read_header(handle):
                return
            offset = _HEADER.size
            while offset < self.size:
                record = self._read_record(handle, offset)
                if record is None:
                    return
                yield record
                offset = handle.tell()

    def _read_record(self, handle: BinaryIO, offset: int) -> LogRecord | None:
        raw = handle.read(_RECORD.size)
        if len(raw) < _RECORD.size:
            self.torn = True
            return None
        length, crc = _RECORD.unpack(raw)
        end = offset + _RECORD.size + length
        if length < _PAYLOAD.size or length > MAX_RECORD_BYTES or end > self.size:
            self._bad(offset, end)
            return None
        payload = handle.read(length)
        if zlib.crc32(payload) != crc or len(payload) != length:
            self._bad(offset, end)
            return None
        media, spans, skipped_count, expanded = _PAYLOAD.unpack_from(payload)
        skipped_end = _PAYLOAD.size + 4 * skipped_count
        if media >= len(MEDIA_TYPES) or skipped_end > length:
            self._bad(offset, end)
            return None
        skipped = struct.unpack_from(f"<{skipped_count}I", payload, _PAYLOAD.size)
        body = payload[skipped_end:]
        return LogRecord(LoggedRequest(MEDIA_TYPES[media], spans, skipped, expanded, body), offset)

    def _bad(self, offset: int, end: int) -> None:
        # A bad record reaching the end of the file is the tail of a write that never completed.
        if end >= self.size:
            self.torn = True
        else:
            self.damaged_at = offset
