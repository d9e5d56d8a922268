"""What decoding an OTLP trace request yields, and the per-span rules both encodings share.

``otlp_decode`` (protobuf) and ``otlp_json`` (OTLP/JSON) each turn a request body into ``SpanRecord``s
plus the rejections OTLP's ``partial_success`` reports; this module holds what they have in common:
the count limits, the result type, the error types and the checks a span must pass whatever its
encoding (times the ``timestamp[ns]`` columns can hold, kinds and status codes OTLP defines).

May import: tracelearn.collector.span_rows, opentelemetry-sdk (its span limits).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace import SpanLimits

from tracelearn.collector.span_rows import SpanRecord

# OTLP enum value -> the SDK enum member name that ``from_readable_span`` stores. OTLP numbers kinds
# from UNSPECIFIED=0, which the spec lets a receiver read as INTERNAL.
SPAN_KINDS: tuple[str, ...] = ("INTERNAL", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
STATUS_CODES: tuple[str, ...] = ("UNSET", "OK", "ERROR")
# The spans table stores times as timestamp[ns] (int64): OTLP's uint64 nanoseconds above this do not fit.
MAX_TIME_NS = 2**63 - 1
# How many rejection reasons the error message spells out; the rest are counted.
MAX_REASONS = 5


class OtlpDecodeError(ValueError):
    """The body is not an OTLP trace export request (the receiver answers 400 with this message)."""


class InvalidSpanError(Exception):
    """One span (or every span under one resource or scope) cannot become a row; ``str`` is why."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Count limits per span and per resource; ``None`` means unlimited. Extra items are dropped (the first kept).

    Resource attributes get the span attribute limit: every span's row carries its resource's map.
    """

    max_attributes: int | None = 128
    max_events: int | None = 128
    max_links: int | None = 128
    max_event_attributes: int | None = 128
    max_link_attributes: int | None = 128

    @classmethod
    def from_env(cls) -> "DecodeLimits":
        """The limits the OTel SDK applies in process, from the same ``OTEL_*`` variables."""
        sdk = SpanLimits()
        return cls(
            max_attributes=sdk.max_span_attributes,
            max_events=sdk.max_events,
            max_links=sdk.max_links,
            max_event_attributes=sdk.max_event_attributes,
            max_link_attributes=sdk.max_link_attributes,
        )


DEFAULT_LIMITS = DecodeLimits.from_env()


@dataclass(slots=True)
class DecodedSpans:
    """What one request body yielded: the accepted spans, and what was rejected or dropped and why."""

    records: list[SpanRecord] = field(default_factory=list)
    # Position in the request (resource, scope, span order) of each record.
    positions: list[int] = field(default_factory=list)
    rejected_spans: int = 0
    # The first ``MAX_REASONS`` rejection reasons, each naming the span and the field.
    reasons: list[str] = field(default_factory=list)
    # Attributes, events and links beyond the count limits (the spans themselves are kept).
    dropped_items: int = 0

    def reject(self, reason: str, spans: int = 1) -> None:
        self.rejected_spans += spans
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    @property
    def error_message(self) -> str:
        """Text for OTLP ``partial_success.error_message``; empty when every span was kept whole."""
        return rejection_message(self.rejected_spans, self.reasons, self.dropped_items)


def rejection_message(rejected: int, reasons: Sequence[str], dropped_items: int) -> str:
    """The ``partial_success`` text for ``rejected`` spans (``reasons`` for the first few) and dropped items."""
    parts = []
    if rejected:
        more = rejected - len(reasons)
        parts.append(f"rejected {rejected} span(s): {'; '.join(reasons)}" + (f"; and {more} more" if more > 0 else ""))
    if dropped_items:
        parts.append(
            f"dropped {dropped_items} attribute(s)/event(s)/link(s) beyond the span limits "
            "(OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_SPAN_EVENT_COUNT_LIMIT, OTEL_SPAN_LINK_COUNT_LIMIT)"
        )
    return "; ".join(parts)


def limited(items: Sequence[Any], limit: int | None, out: DecodedSpans) -> Sequence[Any]:
    """The first ``limit`` of ``items``; the rest are counted in ``out.dropped_items``."""
    if limit is None or len(items) <= limit:
        return items
    out.dropped_items += len(items) - limit
    return items[:limit]


def span_label(index: int, name: Any, span_id: Any) -> str:
    ident = span_id.hex() if isinstance(span_id, bytes) else str(span_id)
    return f"span #{index} {name!r} (span_id {ident or '<empty>'})"


def check_times(start_ns: int, end_ns: int) -> None:
    """Raise ``InvalidSpanError`` unless ``0 < start <= end <= MAX_TIME_NS``."""
    if start_ns <= 0:
        raise InvalidSpanError("start_time_unix_nano is missing")
    if end_ns < start_ns:
        raise InvalidSpanError(f"end_time_unix_nano {end_ns} is before start_time_unix_nano {start_ns}")
    if end_ns > MAX_TIME_NS:
        what = "start_time_unix_nano" if start_ns > MAX_TIME_NS else "end_time_unix_nano"
        value = start_ns if start_ns > MAX_TIME_NS else end_ns
        raise InvalidSpanError(f"{what} {value} is after 2262-04-11, the last time a timestamp[ns] column holds")


def check_event_time(time_ns: int, what: str) -> None:
    """Raise ``InvalidSpanError`` unless ``0 <= time_ns <= MAX_TIME_NS``."""
    if not 0 <= time_ns <= MAX_TIME_NS:
        raise InvalidSpanError(f"{what} {time_ns} is outside 1970..2262, what a timestamp[ns] column holds")


def check_enums(kind: int, status_code: int) -> None:
    if not 0 <= kind < len(SPAN_KINDS):
        raise InvalidSpanError(f"kind {kind} is not an OTLP SpanKind")
    if not 0 <= status_code < len(STATUS_CODES):
        raise InvalidSpanError(f"status.code {status_code} is not an OTLP StatusCode")
