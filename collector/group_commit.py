"""Group commit: one thread appends every waiting request to the request log in one write and one fsync.

Handler threads validate their request (``otlp_validate``) and queue it here; the committer drops
spans whose key was committed recently (``dedup``: a client retrying a request whose answer it never
got), appends what is new of every queued request to the active request log segment with one
``write`` and one ``fsync`` (``request_log``), and only then wakes each waiting request, which is
acknowledged. Many concurrent requests share one fsync, so throughput stays high while each answer
still waits for its own data to be durable.

The committer also seals the active segment once the rows it will make reach ``roll_bytes`` or its
first record is ``roll_seconds`` old, and hands sealed segments to ``on_sealed`` (the conversion).

May import: tracelearn.collector (request_log, dedup, backpressure, metrics), the standard library.
"""

import logging
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tracelearn.collector.backpressure import RETRY_AFTER_STARTING, RETRY_AFTER_UNAVAILABLE, UnavailableError
from tracelearn.collector.dedup import KEY_BYTES, RecentSpanKeys, new_positions
from tracelearn.collector.metrics import ReceiverCounters
from tracelearn.collector.otlp_wire import Body
from tracelearn.collector.request_log import LoggedRequest, RequestLog

logger = logging.getLogger(__name__)

# How often an idle committer looks at the age of the active segment.
IDLE_CHECK_SECONDS = 0.5
# Memory a span takes while its group commits: its key as an object in a list and in the group's set.
COMMIT_BYTES_PER_SPAN = 130


@dataclass(slots=True)
class PendingRequest:
    """One validated request waiting for its commit, and what became of it."""

    media_type: str
    body: Body
    spans: int  # spans in the body
    accepted: "array[int] | None"  # positions (request order) of the spans to keep; None: all of them
    keys: bytes  # KEY_BYTES per accepted span, same order
    expanded_bytes: int
    done: threading.Event = field(default_factory=threading.Event)
    written: int = 0
    duplicates: int = 0
    error: str | None = None

    def split_keys(self) -> list[bytes]:
        keys = self.keys
        return [keys[i : i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)]

    def record(self, kept: list[int] | None) -> LoggedRequest:
        """The log record keeping the accepted spans at indices ``kept`` (``None``: all of them)."""
        accepted = range(self.spans) if self.accepted is None else self.accepted
        count = len(accepted)
        if kept is None and self.accepted is None:
            return LoggedRequest(self.media_type, self.spans, (), self.expanded_bytes, self.body)
        kept_positions = set(accepted) if kept is None else {accepted[i] for i in kept}
        skipped = tuple(p for p in range(self.spans) if p not in kept_positions)
        expanded = self.expanded_bytes * len(kept_positions) // count if count else 0
        return LoggedRequest(self.media_type, self.spans, skipped, expanded, self.body)


class GroupCommitter:
    """The committer thread (see the module docstring). ``commit`` blocks until the request is durable."""

    def __init__(
        self,
        log: RequestLog,
        recent: RecentSpanKeys,
        counters: ReceiverCounters,
        on_write_error: Callable[[OSError], None],
        on_sealed: Callable[[list[Path]], None],
        roll_bytes: int,
        roll_seconds: float,
    ) -> None:
        self._log = log
        self._recent = recent
        self._counters = counters
        self._on_write_error = on_write_error
        self._on_sealed = on_sealed
        self._roll_bytes = roll_bytes
        self._roll_seconds = roll_seconds
        self._queue: list[PendingRequest] = []
        self._wakeup = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tracelearn-commit", daemon=True)
        self._thread.start()

    def commit(self, pending: PendingRequest, timeout: float) -> PendingRequest:
        """Queue ``pending`` and wait for its commit; raises ``UnavailableError`` (stopping, disk, timeout)."""
        with self._wakeup:
            if self._stopping:
                raise UnavailableError("the collector is shutting down", RETRY_AFTER_STARTING)
            self._queue.append(pending)
            self._wakeup.notify()
        if not pending.done.wait(timeout):
            raise UnavailableError(
                f"the request log append did not finish within {timeout:.0f} s (a stalled disk?)",
                RETRY_AFTER_UNAVAILABLE,
            )
        if pending.error is not None:
            raise UnavailableError(pending.error, RETRY_AFTER_UNAVAILABLE)
        return pending

    def stop(self) -> None:
        """Commit what is queued, seal the active segment, then end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if not self._queue and not self._stopping:
                    self._wakeup.wait(IDLE_CHECK_SECONDS)
                group, self._queue = self._queue, []
                stopping = self._stopping
            if group:
                try:
                    self._write_group(group)
                except Exception as exc:  # a bug, not the disk: fail these requests, keep serving
                    logger.exception("tracelearn collector: a group commit of %d requests failed", len(group))
                    for pending in group:
                        pending.error = f"internal error while writing: {exc}"
                        pending.done.set()
            if stopping and not group:
                self._seal()
                return
            if self._log.active_expanded_bytes >= self._roll_bytes or self._log.active_age >= self._roll_seconds:
                self._seal()

    def _seal(self) -> None:
        self._log.seal()
        self._hand_over()

    def _hand_over(self) -> None:
        sealed = self._log.take_sealed()
        if sealed:
            self._on_sealed(sealed)

    def _write_group(self, group: list[PendingRequest]) -> None:
        earlier: set[bytes] = set()
        records: list[LoggedRequest] = []
        new_keys: list[list[bytes]] = []
        for pending in group:
            keys = pending.split_keys()
            kept = new_positions(keys, self._recent, earlier)
            pending.written = len(keys) if kept is None else len(kept)
            pending.duplicates = len(keys) - pending.written
            if pending.written:
                records.append(pending.record(kept))
                new_keys.append(keys if kept is None else [keys[i] for i in kept])
        started = time.perf_counter()
        try:
            self._log.append(records)
        except OSError as exc:
            self._on_write_error(exc)
            self._hand_over()  # the segment whose append failed is sealed: its earlier records convert
            with self._counters.lock:
                self._counters.write_failures += 1
            for pending in group:
                pending.error = f"the disk refuses writes: {exc}"
                pending.done.set()
            return
        elapsed = time.perf_counter() - started
        for keys in new_keys:
            self._recent.add_all(keys)
        written = sum(pending.written for pending in group)
        counters = self._counters
        with counters.lock:
            if records:
                counters.commits += 1
                counters.commit_seconds.observe(elapsed)
            counters.spans_spooled += written
            counters.spans_duplicate += sum(pending.duplicates for pending in group)
            counters.spans_accepted += sum(pending.written + pending.duplicates for pending in group)
        for pending in group:
            pending.done.set()
