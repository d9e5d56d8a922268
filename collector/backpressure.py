"""Backpressure: the byte-bounded queue every request's memory counts in, the refusals, and disk health.

- ``WriteQueue``: the memory requests hold, from their first body byte read until their commit ends
  (wire bytes as they arrive, inflated bytes as they are produced, then what decoding will hold at
  most). A request is refused (``QueueFullError``: 429 / RESOURCE_EXHAUSTED) while others hold the
  rest of the bound, and for good (``RequestTooLargeError``: 413) when it alone needs more than the
  whole bound. So the memory of requests in flight never exceeds ``--queue-bytes``.
- ``UnavailableError`` (503 / UNAVAILABLE): starting, draining, or the disk refuses writes.
  ``WriteHealth`` remembers the last write failure until ``probe_disk`` succeeds again.

Both retryable refusals carry the seconds after which a retry makes sense.

May import: the standard library.
"""

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Seconds a client is told to wait: the queue drains within a commit or two; a full disk takes longer.
RETRY_AFTER_QUEUE_FULL = 1.0
RETRY_AFTER_UNAVAILABLE = 5.0
RETRY_AFTER_STARTING = 2.0
# While the disk refuses writes, a file this big written, fsynced and deleted is the test that it takes writes again.
PROBE_BYTES = 1 * 1024 * 1024
PROBE_SECONDS = 1.0


class RetryLaterError(Exception):
    """The receiver cannot take this request now; a retry after ``retry_after`` seconds may succeed."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(RetryLaterError):
    """The write queue is at its byte bound (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class UnavailableError(RetryLaterError):
    """Starting, draining, or the disk refuses writes (HTTP 503, gRPC UNAVAILABLE)."""


class RequestTooLargeError(ValueError):
    """One request needs more memory than the whole write queue (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""


class WriteQueue:
    """Bytes held by requests, from reading their body to the end of their commit, against a bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        return self._bytes

    def full(self) -> bool:
        return self._bytes >= self.limit

    @contextlib.contextmanager
    def reserved(self) -> Iterator["Reservation"]:
        """A reservation (grown as the request is read and decoded), released at the end."""
        reservation = Reservation(self)
        try:
            yield reservation
        finally:
            with self._lock:
                self._bytes -= reservation.nbytes
            reservation.nbytes = 0

    def _resize(self, reservation: "Reservation", nbytes: int) -> None:
        with self._lock:
            total = reservation.nbytes + nbytes
            if total > self.limit:
                raise RequestTooLargeError(
                    f"the request needs {total} bytes of memory to read and decode, more than the whole write "
                    f"queue ({self.limit} bytes, --queue-bytes); send smaller batches (or protobuf, not JSON)"
                )
            if nbytes > 0 and self._bytes + nbytes > self.limit:
                raise QueueFullError(
                    f"the write queue holds {self._bytes} of {self.limit} bytes; retry later", RETRY_AFTER_QUEUE_FULL
                )
            self._bytes += nbytes
            reservation.nbytes = total


class Reservation:
    """One request's bytes in the ``WriteQueue``."""

    def __init__(self, queue: WriteQueue) -> None:
        self._queue = queue
        self.nbytes = 0

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more; raises ``QueueFullError`` or ``RequestTooLargeError`` when they do not fit."""
        if nbytes > 0:
            self._queue._resize(self, nbytes)

    def resize(self, nbytes: int) -> None:
        """Hold exactly ``nbytes`` (more or fewer than now)."""
        if nbytes != self.nbytes:
            self._queue._resize(self, nbytes - self.nbytes)


class WriteHealth:
    """Whether the disk takes writes; after a failure every request is refused until a probe succeeds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """Why writes are refused, or ``None`` while the disk takes them."""
        return self._problem

    def failed(self, error: OSError) -> None:
        with self._lock:
            first = self._problem is None
            self._problem = str(error)
        if first:  # once per outage, not once per request
            logger.error(
                "tracelearn collector: refusing spans (503, Retry-After %.0f s) because %s; what is acknowledged "
                "is on disk, probing every %.0f s",
                RETRY_AFTER_UNAVAILABLE,
                error,
                PROBE_SECONDS,
            )

    def recovered(self) -> None:
        with self._lock:
            was, self._problem = self._problem, None
        if was is not None:
            logger.warning("tracelearn collector: writes work again; accepting spans")


def probe_disk(directory: Path, nbytes: int = PROBE_BYTES) -> None:
    """Write, fsync and delete a file of ``nbytes`` in ``directory``; raises ``OSError`` if the disk refuses."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(bytes(nbytes))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
