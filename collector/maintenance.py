"""The receiver's background thread: start-up replay, conversion into Parquet, replay of exited writers, disk probes.

One thread, in this order:

1. **Start-up replay**: every spool segment that exited writers on this host left behind (an
   agent's that died) becomes Parquet files (``spool.replay_spools``); the request logs of an exited
   collector are adopted: their keys are read (``conversion.logged_keys``, ids only: fast) and they
   are queued for conversion like this process's own. The de-duplication window is seeded from the
   key index (``dedup.KeyIndex``), the adopted logs' keys and the rows the replay landed. Only then
   is the receiver ready: a backlog left by a crash is converted while it serves.
2. **Conversion**: request log segments the committer sealed are converted one at a time, oldest
   first (``conversion.convert_log_segment``). A disk that refuses the writes leaves the segment for
   a retry a second later (``conversion_failures``); a segment that cannot be read at all goes to the
   quarantine. Requests are refused while the sealed segments waiting here exceed
   ``max_backlog_bytes`` (``backlog_problem``), so a conversion that falls behind cannot fill the disk.
3. **Replay** of exited writers' spools again once per roll period (an agent that exits meanwhile).
4. **Probe**: while the disk refuses writes (``WriteHealth``), a small fsynced file tells when it
   takes them again.

``finish()`` converts what is left, then ends the thread.

May import: tracelearn.collector, tracelearn.schemas.
"""

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tracelearn.collector.backpressure import PROBE_SECONDS, WriteHealth, probe_disk
from tracelearn.collector.conversion import convert_log_segment, logged_keys
from tracelearn.collector.dedup import KEY_BYTES, KeyIndex, RecentSpanKeys
from tracelearn.collector.metrics import ReceiverCounters
from tracelearn.collector.otlp_spans import DecodeLimits
from tracelearn.collector.request_log import log_segment_name
from tracelearn.collector.spool import ReplayReport, SegmentFormatError, quarantine_segment, replay_spools
from tracelearn.schemas.tables import SPANS
from tracelearn.storage.atomic_files import is_disk_error

logger = logging.getLogger(__name__)


class Maintenance:
    """The background thread (see the module docstring)."""

    def __init__(
        self,
        spans_root: Path,
        compression: str,
        max_attribute_bytes: int,
        limits: DecodeLimits,
        roll_seconds: float,
        counters: ReceiverCounters,
        health: WriteHealth,
        recent: RecentSpanKeys,
        key_index: KeyIndex,
        on_ready: Callable[[], None],
    ) -> None:
        self.spans_root = spans_root
        self.compression = compression
        self.max_attribute_bytes = max_attribute_bytes
        self.limits = limits
        self.roll_seconds = roll_seconds
        self.counters = counters
        self.health = health
        self.recent = recent
        self.key_index = key_index
        self._on_ready = on_ready
        self._sealed: collections.deque[tuple[Path, int]] = collections.deque()  # with their sizes
        self._adopted: set[Path] = set()  # exited writers' request logs among them
        self._backlog_bytes = 0
        self._lock = threading.Condition()
        self._finishing = False
        self._thread: threading.Thread | None = None
        self.own_spans_done = 0  # spans of this process's segments converted, quarantined or dropped as repeats
        self.segments_left = 0  # after finish(): sealed segments that could not be converted

    @property
    def backlog_bytes(self) -> int:
        """Bytes of sealed segments waiting for conversion."""
        return self._backlog_bytes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tracelearn-maintenance", daemon=True)
        self._thread.start()

    def submit(self, paths: list[Path]) -> None:
        """Sealed request log segments, oldest first, to convert."""
        with self._lock:
            for path in paths:
                size = _size(path)
                self._sealed.append((path, size))
                self._backlog_bytes += size
            self._lock.notify()

    def finish(self) -> None:
        """Convert every submitted segment, then end the thread (at once if it never started)."""
        with self._lock:
            self._finishing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._convert_all()
        self.segments_left = len(self._sealed)

    # --- the thread

    def _run(self) -> None:
        self._replay_at_start()
        next_replay = time.monotonic() + self.roll_seconds
        while True:
            with self._lock:
                if not self._sealed and not self._finishing:
                    self._lock.wait(PROBE_SECONDS)
                finishing = self._finishing
            try:
                if self.health.problem is not None:
                    self._probe()
                self._convert_all()
                if finishing:
                    return
                if time.monotonic() >= next_replay:
                    self._replay()
                    next_replay = time.monotonic() + self.roll_seconds
            except Exception:  # a bug: keep the thread (conversions, probes) alive, say it once per occurrence
                logger.exception("tracelearn collector: background conversion or replay failed; retrying")
                if finishing:
                    return
                time.sleep(PROBE_SECONDS)

    def _replay_at_start(self) -> None:
        started = time.monotonic()
        try:
            keys = self.key_index.load()
            self.recent.add_all(keys[-self.recent.capacity :] if self.recent.capacity > 0 else [])
            report = self._replay()
            self.recent.add_all(report.keys)
            logger.info(
                "tracelearn collector: start-up replay done in %.1f s (%d keys seeded for de-duplication)",
                time.monotonic() - started,
                len(self.recent),
            )
        except Exception:
            logger.exception("tracelearn collector: the start-up replay failed; it is retried every roll period")
        finally:
            self._on_ready()

    def _replay(self) -> ReplayReport:
        report = replay_spools(
            self.spans_root,
            SPANS,
            self.compression,
            max_attribute_bytes=self.max_attribute_bytes,
            limits=self.limits,
            collect_keys=True,
            key_index=self.key_index,
            request_logs=False,
        )
        self._adopt(report.request_logs)
        if report.segments:
            logger.info(
                "tracelearn collector: replayed %d spans from %d spool segments of exited writers into %d files "
                "(%d duplicates dropped, %d torn tails of unacknowledged writes ignored, %d spans quarantined)",
                report.rows,
                report.segments,
                len(report.files),
                report.duplicates,
                report.torn_tails,
                report.quarantined_spans,
            )
        with self.counters.lock:
            self.counters.spans_replayed += report.rows
            self.counters.files_rolled += len(report.files)
            self.counters.spans_quarantined += report.quarantined_spans
            self.counters.segments_quarantined += report.quarantined_segments
        return report

    def _adopt(self, paths: list[Path]) -> None:
        """Queue exited writers' request logs for conversion, their keys in the window first."""
        for path in paths:
            if path in self._adopted:
                continue
            try:
                keys = logged_keys(path, self.limits)
            except (OSError, SegmentFormatError):
                keys = b""  # its conversion sets it aside
            self.recent.add_all(keys[i : i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES))
            self._adopted.add(path)
            self.submit([path])
            logger.info("tracelearn collector: adopted %s of an exited collector (%d spans) for conversion", path.name,
                        len(keys) // KEY_BYTES)

    def _convert_all(self) -> None:
        while True:
            with self._lock:
                if not self._sealed:
                    return
                path, size = self._sealed[0]
            if not self._convert(path):
                return  # the disk refuses writes: retried on the next round
            with self._lock:
                self._sealed.popleft()
                self._backlog_bytes -= size

    def _convert(self, path: Path) -> bool:
        """Convert one of this process's segments; ``False`` when the disk refused (the segment stays)."""
        name = log_segment_name(path.name)
        assert name is not None, f"{path} is a request log segment"
        size = _size(path)
        started = time.monotonic()
        try:
            report = convert_log_segment(
                path, name, self.spans_root, SPANS, self.compression, self.max_attribute_bytes, self.limits,
                self.key_index,
            )
        except SegmentFormatError as exc:
            report = quarantine_segment(path, name, self.spans_root, str(exc))
        except OSError as exc:
            if not is_disk_error(exc):
                report = quarantine_segment(path, name, self.spans_root, f"cannot be converted: {exc}")
            else:
                with self.counters.lock:
                    self.counters.conversion_failures += 1
                logger.warning("tracelearn collector: converting %s into Parquet failed (%s); retrying", path, exc)
                return False
        except Exception as exc:  # a segment that breaks the reader must not stop the others
            logger.exception("tracelearn collector: %s cannot be converted", path)
            reason = f"cannot be converted: {type(exc).__name__}: {exc}"
            report = quarantine_segment(path, name, self.spans_root, reason)
        adopted = path in self._adopted
        self._adopted.discard(path)
        with self.counters.lock:
            if adopted:
                self.counters.spans_replayed += report.rows
            else:
                self.counters.spans_written += report.rows
            self.counters.files_rolled += len(report.files)
            self.counters.spans_quarantined += report.quarantined_spans
            self.counters.segments_quarantined += report.quarantined_segments
        if not adopted:
            self.own_spans_done += report.rows + report.quarantined_spans + report.duplicates
        logger.info(
            "tracelearn collector: converted %d spans (%d bytes of requests) into %d Parquet files in %.2f s",
            report.rows,
            size,
            len(report.files),
            time.monotonic() - started,
        )
        return True

    def _probe(self) -> None:
        """While writes are refused: write, fsync and delete a probe file in the spool's directory."""
        try:
            probe_disk(self.key_index.directory)
        except OSError:
            return
        self.health.recovered()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
