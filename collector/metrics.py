"""What the collector sidecar counts, and how ``/metrics`` (Prometheus text) and the log say it.

``ReceiverCounters`` are changed by the request handlers, the group committer and the conversion
thread under one lock; ``metrics_text`` renders them with the gauges of ``OtlpReceiver.status()``.
``ThrottledWarnings`` keeps a client that sends the same bad request on every retry from flooding
the log.

May import: the standard library.
"""

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

METRIC_PREFIX = "tracelearn_collector_"
COMMIT_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# At most one log line per kind of refusal or rejection in this many seconds.
WARNING_INTERVAL_SECONDS = 10.0


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count); observed under its owner's lock."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            label = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{le="{label}"}} {cumulative}')
        out.append(f"{name}_sum {self.total}")
        out.append(f"{name}_count {cumulative}")
        return out


@dataclass
class ReceiverCounters:
    """Everything ``/metrics`` and ``/status`` count since start; changed under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    spans_accepted: int = 0  # acknowledged: durable in the request log (duplicates included)
    spans_spooled: int = 0  # new spans appended to the request log
    spans_duplicate: int = 0
    spans_rejected: dict[str, int] = field(default_factory=dict)  # by reason
    spans_written: int = 0  # converted into Parquet from this process's request log
    spans_replayed: int = 0  # from segments of exited writers
    spans_quarantined: int = 0  # acknowledged spans set aside with their reason
    segments_quarantined: int = 0
    attribute_values_truncated: int = 0
    span_items_dropped: int = 0  # attributes, events, links beyond the count limits
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (front, path, code)
    commits: int = 0
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(COMMIT_SECONDS_BUCKETS))
    write_failures: int = 0
    conversion_failures: int = 0
    files_rolled: int = 0
    feedback_accepted: int = 0
    feedback_rejected: int = 0

    def rejected(self, reason: str, spans: int) -> None:
        if spans:
            with self.lock:
                self.spans_rejected[reason] = self.spans_rejected.get(reason, 0) + spans

    def count_request(self, front: str, path: str, code: str) -> None:
        key = (front, path, code)
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1


class ThrottledWarnings:
    """Log lines about refused requests and rejected spans: per kind, at most one every ``interval`` s.

    One line per kind and interval, with the number of lines held back, says what happens without
    flooding the log.
    """

    def __init__(self, interval: float = WARNING_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (when logged, held back since)

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            logged, held_back = self._last.get(kind, (-math.inf, 0))
            if now - logged < self.interval:
                self._last[kind] = (logged, held_back + 1)
                return
            self._last[kind] = (now, 0)
        more = f" ({held_back} more like it in the last {self.interval:.0f} s)" if held_back else ""
        logger.warning("tracelearn collector: %s%s", message, more)


# (metric name, type, help, key of ``OtlpReceiver.status()``)
SCALAR_METRICS = (
    ("ready", "gauge", "1 while spans are accepted.", "ready"),
    ("spans_accepted_total", "counter", "Spans acknowledged as durable (duplicates included).", "spans_accepted"),
    ("spans_spooled_total", "counter", "New spans appended to the write-ahead request log.", "spans_spooled"),
    ("spans_written_total", "counter", "Spans converted into Parquet files from this process's log.", "spans_written"),
    ("spans_replayed_total", "counter", "Spans replayed from spools of exited writers.", "spans_replayed"),
    ("spans_duplicate_total", "counter", "Spans acknowledged without writing: committed recently.", "spans_duplicate"),
    (
        "spans_quarantined_total",
        "counter",
        "Acknowledged spans set aside in spans/_quarantine with their reason (not in the dataset).",
        "spans_quarantined",
    ),
    ("segments_quarantined_total", "counter", "Spool segments (or their damaged rest) set aside whole.",
     "segments_quarantined"),
    (
        "attribute_values_truncated_total",
        "counter",
        "Attribute values cut to TRACELEARN_MAX_ATTRIBUTE_BYTES.",
        "attribute_values_truncated",
    ),
    (
        "span_items_dropped_total",
        "counter",
        "Attributes (resource ones included), events and links beyond the count limits.",
        "span_items_dropped",
    ),
    ("queue_bytes", "gauge", "Memory held by requests being read, decoded or committed.", "queue_bytes"),
    ("queue_limit_bytes", "gauge", "The write queue bound (429 above it).", "queue_limit_bytes"),
    ("spans_awaiting_conversion", "gauge", "Acknowledged spans in the request log, not yet in Parquet.",
     "spans_awaiting_conversion"),
    ("conversion_backlog_bytes", "gauge", "Bytes of sealed request log segments waiting for conversion.",
     "conversion_backlog_bytes"),
    ("spool_bytes", "gauge", "Bytes of spool segments and request logs on disk.", "spool_bytes"),
    ("quarantine_entries", "gauge", "Entries (files with a reason) in spans/_quarantine.", "quarantine_entries"),
    ("disk_free_bytes", "gauge", "Free bytes on the data root's filesystem.", "disk_free_bytes"),
    ("dedup_window_keys", "gauge", "Span keys remembered for de-duplication.", "dedup_window_keys"),
    ("commits_total", "counter", "Group commits (one request log write and fsync each).", "commits"),
    ("write_failures_total", "counter", "Request log appends the disk refused.", "write_failures"),
    ("conversion_failures_total", "counter", "Conversions into Parquet the disk refused (retried).",
     "conversion_failures"),
    ("files_rolled_total", "counter", "Parquet files written by conversions.", "files_rolled"),
    ("feedback_accepted_total", "counter", "Feedback items written.", "feedback_accepted"),
    ("feedback_rejected_total", "counter", "Feedback items in rejected requests.", "feedback_rejected"),
)


def _labelled(name: str, help_text: str, samples: Iterable[tuple[str, int]]) -> list[str]:
    lines = [f"# HELP {METRIC_PREFIX}{name} {help_text}", f"# TYPE {METRIC_PREFIX}{name} counter"]
    return lines + [f"{METRIC_PREFIX}{name}{{{labels}}} {value}" for labels, value in samples]


def metrics_text(status: Mapping[str, Any], counters: ReceiverCounters) -> str:
    """Prometheus text exposition format 0.0.4 of ``status`` (``OtlpReceiver.status()``) and ``counters``."""
    with counters.lock:
        requests = sorted(counters.requests.items())
        commit_lines = counters.commit_seconds.lines(f"{METRIC_PREFIX}commit_seconds")
    lines: list[str] = []
    for name, kind, help_text, key in SCALAR_METRICS:
        lines += [f"# HELP {METRIC_PREFIX}{name} {help_text}", f"# TYPE {METRIC_PREFIX}{name} {kind}"]
        lines.append(f"{METRIC_PREFIX}{name} {int(status[key])}")
    lines += _labelled(
        "spans_rejected_total",
        "Decoded spans not kept, by reason (requests refused before decoding count in requests_total).",
        [(f'reason="{reason}"', n) for reason, n in status["spans_rejected"].items()],
    )
    lines += _labelled(
        "requests_total",
        "Answered requests by front, path and status code.",
        [(f'front="{front}",path="{path}",code="{code}"', n) for (front, path, code), n in requests],
    )
    lines.append(f"# HELP {METRIC_PREFIX}commit_seconds Duration of one group commit (request log write and fsync).")
    lines.append(f"# TYPE {METRIC_PREFIX}commit_seconds histogram")
    lines += commit_lines
    return "\n".join(lines) + "\n"
