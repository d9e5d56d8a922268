"""What the receiver checks in a trace request before it acknowledges it, without converting any span.

The sidecar acknowledges a request once its body is in the write-ahead request log; spans become
Parquet rows later, off the request path (``conversion``). Everything the client must hear about in
``partial_success`` is decided here, on the request path: each span is parsed (one at a time, see
``otlp_wire``) and checked by the same rules the conversion applies (``otlp_decode.check_pb_span``;
for OTLP/JSON the span is decoded whole), its (trace_id, span_id) is taken for de-duplication, and a
span that would open a partition beyond ``max_partitions`` distinct (date, service) pairs in this
request is rejected. The result also says how much memory the rows will take once converted (each
span carrying its resource's attributes): the request log uses it to size conversion batches.

Memory: before anything is parsed the caller is asked (``reserve``) for what parsing will hold at
most: for protobuf one span's parse at a time plus a key per span; for OTLP/JSON the whole parsed
document, estimated from its count of objects, lists and commas (orjson's Python objects can take
~25x the text for a body of empty objects).

May import: tracelearn.collector.otlp_decode, otlp_json, otlp_spans, otlp_wire, span_rows.
"""

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tracelearn.collector.otlp_decode import (
    JSON_CONTENT_TYPE,
    PROTOBUF_CONTENT_TYPE,
    check_pb_span,
    dropped_items,
    parsed_span,
    protobuf_layout,
    resource_attributes,
    scope_name_of,
)
from tracelearn.collector.otlp_json import json_records
from tracelearn.collector.otlp_spans import DecodedSpans, DecodeLimits, InvalidSpanError, OtlpDecodeError, span_label
from tracelearn.collector.otlp_wire import Body, parse_reservation
from tracelearn.collector.span_rows import NS_PER_DAY, service_of

# Bytes of Arrow per row beyond the span's own wire bytes: hex ids, offsets, validity, fixed-width columns;
# and per map entry (attribute) beyond its key and value: two string offsets.
ROW_OVERHEAD_BYTES = 256
MAP_ENTRY_BYTES = 8
# Bytes held per span until its commit: its 24-byte key and its position (see ``ValidatedRequest``).
KEY_MEMORY_BYTES = 28
# orjson's Python objects: per object or list, per element (a pointer, often a small object), per text byte.
JSON_CONTAINER_BYTES = 200
JSON_ELEMENT_BYTES = 16
JSON_TEXT_FACTOR = 2
DEFAULT_MAX_PARTITIONS = 64


def json_parse_memory(body: Body) -> int:
    """An upper estimate of the memory orjson's objects take for ``body``."""
    containers = body.count(b"{") + body.count(b"[")
    return JSON_TEXT_FACTOR * len(body) + JSON_CONTAINER_BYTES * containers + JSON_ELEMENT_BYTES * body.count(b",")


@dataclass(slots=True)
class ValidatedRequest:
    """A trace request checked span by span: which spans will become rows, under which keys."""

    media_type: str
    spans: int  # spans in the body, accepted or not
    # Positions (request order) of the spans kept, and their trace_id (16 bytes) + span_id (8), same order.
    # Flat arrays, not lists of objects: a body of 400,000 tiny spans holds 11 MB here, not 60.
    accepted: "array[int]" = field(default_factory=lambda: array("I"))
    keys: bytearray = field(default_factory=bytearray)
    decoded: DecodedSpans = field(default_factory=DecodedSpans)  # rejections, reasons, dropped items
    truncated_values: int = 0  # string values longer than the attribute limit (cut at conversion)
    expanded_bytes: int = 0  # estimated bytes of the accepted spans' rows

    def message(self, max_attribute_bytes: int) -> str:
        """The ``partial_success.error_message``; empty when every span is kept whole."""
        text = self.decoded.error_message
        if self.truncated_values:
            note = f"truncated {self.truncated_values} attribute value(s) longer than {max_attribute_bytes} bytes"
            text = f"{text}; {note}" if text else note
        return text


class _Partitions:
    """The distinct (day, service) pairs of one request, up to a bound."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.seen: set[tuple[int, str]] = set()

    def check(self, start_ns: int, service: str) -> None:
        key = (start_ns // NS_PER_DAY, service)
        if key in self.seen:
            return
        if len(self.seen) >= self.bound:
            raise InvalidSpanError(
                f"the request already has spans in {self.bound} partitions (date, service), the most one request "
                "may open; send spans of other days or services in another request"
            )
        self.seen.add(key)


def _long_strings(attributes: Any, limit: int) -> int:
    return sum(1 for value in attributes.values() if type(value) is str and len(value) > limit)


def validate_protobuf(
    body: Body,
    limits: DecodeLimits,
    max_attribute_bytes: int,
    max_partitions: int,
    reserve: Callable[[int], None],
) -> ValidatedRequest:
    """Check a protobuf request span by span; raises ``OtlpDecodeError`` when its framing is not a request."""
    layout = protobuf_layout(body, reserve)
    reserve(parse_reservation(layout.largest_message) + KEY_MEMORY_BYTES * layout.spans)
    result = ValidatedRequest(PROTOBUF_CONTENT_TYPE, layout.spans)
    out = result.decoded
    partitions = _Partitions(max_partitions)
    check_lengths = len(body) > max_attribute_bytes  # no string value can be longer than the body
    accepted, keys = result.accepted, result.keys
    position = expanded = 0
    for resource_layout in layout.resources:
        problem = ""
        resource: dict[str, Any] = {}
        try:
            resource = resource_attributes(body, resource_layout.resource, limits, out)
        except InvalidSpanError as exc:
            problem = str(exc)
        service = service_of(resource)
        # Every row carries its resource's map: a resource's bytes count once per span under it.
        resource_bytes = sum(len(key) + len(str(value)) + MAP_ENTRY_BYTES for key, value in resource.items())
        resource_long = _long_strings(resource, max_attribute_bytes) if check_lengths else 0
        for scope in resource_layout.scopes:
            scope_problem = problem
            if not scope_problem:
                try:
                    scope_name_of(body, scope.scope)
                except InvalidSpanError as exc:
                    scope_problem = str(exc)
            for start, end in zip(scope.starts, scope.ends, strict=True):
                if scope_problem:
                    out.reject(f"span #{position}: {scope_problem}")
                    position += 1
                    continue
                try:
                    span = parsed_span(body, start, end, position)
                except InvalidSpanError as exc:
                    out.reject(str(exc))
                    position += 1
                    continue
                try:
                    check_pb_span(span)
                    partitions.check(span.start_time_unix_nano, service)
                except InvalidSpanError as exc:
                    out.reject(f"{span_label(position, span.name, span.span_id)}: {exc}")
                    position += 1
                    continue
                out.dropped_items += dropped_items(span, limits)
                if check_lengths:
                    kept_attributes = span.attributes[: limits.max_attributes]
                    result.truncated_values += resource_long + sum(
                        1 for kv in kept_attributes if len(kv.value.string_value) > max_attribute_bytes
                    )
                accepted.append(position)
                keys += span.trace_id
                keys += span.span_id
                expanded += end - start + MAP_ENTRY_BYTES * len(span.attributes) + resource_bytes + ROW_OVERHEAD_BYTES
                position += 1
    result.expanded_bytes = expanded
    return result


def validate_json(
    body: Body,
    limits: DecodeLimits,
    max_attribute_bytes: int,
    max_partitions: int,
    reserve: Callable[[int], None],
) -> ValidatedRequest:
    """Check an OTLP/JSON request span by span (each decoded whole); raises ``OtlpDecodeError``."""
    reserve(json_parse_memory(body))
    out = DecodedSpans()
    result = ValidatedRequest(JSON_CONTENT_TYPE, 0, decoded=out)
    partitions = _Partitions(max_partitions)
    resource_bytes: dict[int, int] = {}  # by id of the resource mapping: one per resource
    per_span_text = 0
    for position, record in json_records(body, limits, out):
        try:
            partitions.check(record.start_ns, service_of(record.resource))
        except InvalidSpanError as exc:
            out.reject(f"{span_label(position, record.name, format(record.span_id, '016x'))}: {exc}")
            continue
        resource = record.resource
        size = resource_bytes.get(id(resource))
        if size is None:
            size = resource_bytes[id(resource)] = sum(
                len(key) + len(str(value)) + MAP_ENTRY_BYTES for key, value in resource.items()
            )
            result.truncated_values += _long_strings(resource, max_attribute_bytes)
        result.truncated_values += _long_strings(record.attributes, max_attribute_bytes)
        result.accepted.append(position)
        result.keys += record.trace_id.to_bytes(16, "big") + record.span_id.to_bytes(8, "big")
        per_span_text += size + ROW_OVERHEAD_BYTES
    result.spans = len(result.accepted) + out.rejected_spans
    result.expanded_bytes = len(body) + per_span_text if result.accepted else 0
    return result


def validate_request(
    body: Body,
    media_type: str,
    limits: DecodeLimits,
    max_attribute_bytes: int,
    max_partitions: int = DEFAULT_MAX_PARTITIONS,
    reserve: Callable[[int], None] = lambda _: None,
) -> ValidatedRequest:
    """``validate_protobuf`` or ``validate_json`` by media type; raises ``OtlpDecodeError`` for others."""
    if media_type == PROTOBUF_CONTENT_TYPE:
        return validate_protobuf(body, limits, max_attribute_bytes, max_partitions, reserve)
    if media_type == JSON_CONTENT_TYPE:
        return validate_json(body, limits, max_attribute_bytes, max_partitions, reserve)
    raise OtlpDecodeError(f"media type {media_type!r} is not an OTLP encoding")
