"""Request bodies of the OTLP/HTTP front: read within limits, a deadline and the write queue, inflated safely.

Owns what an HTTP body costs the collector and when it is refused: ``Content-Length`` or chunked
transfer, bytes counted in the write queue as they arrive (429 when it has no room, 413 when one
request alone needs more than it holds), a total deadline from the first body byte to the last
(408), ``gzip``/``deflate`` inflated incrementally up to the body limit (a gzip bomb is refused
with 413 after inflating at most ``max_body_bytes``), and the lingering close that lets a client
still sending a refused body read the answer instead of a reset.

May import: tracelearn.collector.backpressure, the standard library.
"""

import io
import socket
import time
import zlib
from email.message import Message

from tracelearn.collector.backpressure import (
    QueueFullError,
    RequestTooLargeError,
    Reservation,
    RetryLaterError,
    UnavailableError,
)
from tracelearn.collector.otlp_wire import Body

# Seconds an idle keep-alive connection (or a client that stalls in its headers) is kept.
IDLE_TIMEOUT_SECONDS = 60.0
# Seconds a request body may take from its first byte to its last (408 beyond).
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
# A refused body up to this size is read and dropped so the client can read the answer on a
# healthy connection; a larger one gets the answer and the connection is closed.
DISCARD_LIMIT = 64 * 1024 * 1024
READ_CHUNK = 1 << 16
# A connection closed before its request body was read to the end is closed lingering: our answer is
# sent, then what the client still sends is read and dropped until it has been quiet this long (or
# for at most LINGER_SECONDS). Closing at once would make the kernel reset the connection over the
# unread bytes, and the client, still writing its body, would see a broken pipe instead of the answer.
LINGER_IDLE_SECONDS = 1.0
LINGER_SECONDS = 10.0
# Content-Encoding -> zlib window bits (gzip header, zlib header); identity is no encoding.
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class HttpError(Exception):
    """An answer other than 200; ``close`` ends the connection (the body was not read to its end)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.close = close


def refusal_answer(refusal: RetryLaterError) -> HttpError:
    status = 429 if isinstance(refusal, QueueFullError) else 503
    assert isinstance(refusal, QueueFullError | UnavailableError), "every refusal is one of the two"
    return HttpError(status, str(refusal), retry_after=refusal.retry_after)



def _grow(reservation: Reservation, nbytes: int, close: bool) -> None:
    """Grow ``reservation`` as bytes arrive; a refusal becomes the HTTP answer (429 or 413)."""
    try:
        reservation.grow(nbytes)
    except RetryLaterError as refusal:
        error = refusal_answer(refusal)
        error.close = close  # the rest of the body is not read
        raise error from None
    except RequestTooLargeError as exc:
        raise HttpError(413, str(exc), close=close) from None


def inflate(data: Body, encoding: str, limit: int, reservation: Reservation | None = None) -> bytes:
    """``data`` decompressed, never producing more than ``limit`` bytes (413 beyond, 400 if corrupt).

    Incremental (``decompressobj`` with ``max_length``): a small body that inflates to gigabytes
    costs at most ``limit`` bytes of memory before it is refused. Each piece is added to
    ``reservation`` as it is produced (429 or 413 when the write queue has no room for it).
    Concatenated gzip members are read one after another, as gzip(1) does.
    """
    wbits = ENCODINGS[encoding]
    parts: list[bytes] = []
    produced = 0
    inflater = zlib.decompressobj(wbits)
    pending = data
    try:
        while True:
            chunk = inflater.decompress(pending, limit + 1 - produced)
            produced += len(chunk)
            if produced > limit:
                raise HttpError(413, f"the body inflates to more than {limit} bytes (the limit, --max-body-bytes)")
            if reservation is not None:
                _grow(reservation, len(chunk), close=True)
            parts.append(chunk)
            if inflater.eof:
                rest = inflater.unused_data
                if not rest:
                    break
                if wbits != ENCODINGS["gzip"]:
                    raise HttpError(400, f"{len(rest)} bytes follow the end of the {encoding} stream")
                inflater, pending = zlib.decompressobj(wbits), rest  # the next gzip member
                continue
            pending = inflater.unconsumed_tail
            if not pending:
                # Every input byte is consumed and the stream has not ended: cut off.
                raise HttpError(400, f"the {encoding} body is truncated ({len(data)} bytes)")
    except zlib.error as exc:
        raise HttpError(400, f"the body is not valid {encoding}: {exc}") from None
    return b"".join(parts)


def linger(connection: socket.socket) -> None:
    """Half-close ``connection`` (our answer and a FIN go out), then drop what the client still sends."""
    try:
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(LINGER_IDLE_SECONDS)
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline and connection.recv(READ_CHUNK):
            pass
    except OSError:  # the client closed, reset or went quiet: all the same now
        pass


class RequestBody:
    """The body of one request on ``rfile``: read (``read``), or dropped (``discard``, ``refuse``).

    ``consumed`` says whether it was read to its end (else the connection is closed lingering);
    ``close`` whether the connection must close anyway.
    """

    def __init__(
        self,
        rfile: io.BufferedIOBase,
        connection: socket.socket,
        headers: Message,
        max_body_bytes: int,
        queue_limit: int,
        timeout_s: float,
    ) -> None:
        self.rfile = rfile
        self.connection = connection
        self.headers = headers
        self.max_body_bytes = max_body_bytes
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self.consumed = False
        self.close = False

    def refuse(self, error: HttpError) -> None:
        """Raise ``error`` after reading and dropping the body (so the connection stays usable)."""
        try:
            self.discard()
        except HttpError:
            error.close = True
        raise error

    def discard(self) -> None:
        """Read and drop the body (so the connection stays usable); a chunked one closes the connection."""
        length = self._content_length()
        if self.chunked():
            self.close = True  # not worth parsing the chunks of a body we drop
            return
        if length > DISCARD_LIMIT:
            raise HttpError(413, "body too large to read", close=True)
        deadline = self._deadline()
        while length > 0:
            chunk = self._receive(min(length, READ_CHUNK), deadline)
            length -= len(chunk)
        self.consumed = True

    def chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            raise HttpError(400, f"Content-Length {raw!r} is not a byte count", close=True)
        return length

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def _late(self) -> HttpError:
        timeout = self.timeout_s
        return HttpError(408, f"the body did not arrive within {timeout:g} s (--body-timeout)", close=True)

    def _receive(self, most: int, deadline: float, line: bool = False) -> bytes:
        """Up to ``most`` bytes of the body (a line, with ``line``), whatever has arrived; 408 past ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._late()
        self.connection.settimeout(remaining)
        try:
            # read1, not readinto1: read1 returns what is buffered without waiting for more.
            chunk = self.rfile.readline(most) if line else self.rfile.read1(most)
        except TimeoutError:
            raise self._late() from None
        finally:
            self.connection.settimeout(IDLE_TIMEOUT_SECONDS)
        if not chunk:
            raise HttpError(400, "the body ended early", close=True)
        return chunk

    def read(self, reservation: Reservation) -> Body:
        """The request body, decoded from its transfer and content encodings, within the body limit.

        Every byte read or inflated is added to ``reservation`` as it arrives (429 when the write
        queue has no room, 413 when the request alone needs more than the queue holds).
        """
        limit = self.max_body_bytes
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ENCODINGS and encoding != "identity":
            self.refuse(HttpError(415, f"Content-Encoding {encoding!r}: use gzip, deflate or none"))
        deadline = self._deadline()
        body: Body
        if self.chunked():
            body = self._read_chunked(limit, reservation, deadline)
        else:
            length = self._content_length()
            if length > limit:
                self.refuse(
                    HttpError(413, f"the body is {length} bytes; the limit is {limit} (--max-body-bytes)")
                )
            queue_limit = self.queue_limit
            if length > queue_limit:
                self.refuse(
                    HttpError(413, f"the body is {length} bytes, more than the whole write queue ({queue_limit} bytes, "
                                   "--queue-bytes)")
                )
            body = self._read_exactly(length, reservation, deadline)
        self.consumed = True
        if encoding == "identity":
            return body
        return inflate(body, encoding, limit, reservation)

    def _read_exactly(self, length: int, reservation: Reservation, deadline: float) -> bytearray:
        # One buffer, never copied: its pages count in memory only as bytes arrive, like the reservation.
        body = bytearray(length)
        view = memoryview(body)
        done = 0
        while done < length:
            chunk = self._receive(min(length - done, READ_CHUNK), deadline)
            _grow(reservation, len(chunk), close=True)
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        view.release()
        return body

    def _read_chunked(self, limit: int, reservation: Reservation, deadline: float) -> bytes:
        parts: list[Body] = []
        total = 0
        while True:
            line = self._receive(1024, deadline, line=True)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(400, f"bad chunk size line {line[:40]!r}", close=True) from None
            if size == 0:
                break
            total += size
            if total > limit:
                raise HttpError(413, f"the chunked body exceeds the limit of {limit} bytes", close=True)
            parts.append(self._read_exactly(size, reservation, deadline))
            if self._receive(1024, deadline, line=True) not in (b"\r\n", b"\n"):
                raise HttpError(400, "a chunk of the body is truncated", close=True)
        while self._receive(1024, deadline, line=True) not in (b"\r\n", b"\n"):
            pass  # trailer fields: ignored
        return b"".join(parts)
