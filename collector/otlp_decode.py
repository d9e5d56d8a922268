"""OTLP trace request bodies (protobuf, or OTLP/JSON via ``otlp_json``) decoded into ``SpanRecord``s.

Owns the step from the bytes of an ``ExportTraceServiceRequest`` to accepted ``SpanRecord``s (the
neutral form ``span_rows.SpanColumns`` turns into rows, exactly as it does for the in-process
exporter's SDK spans) plus what OTLP's ``partial_success`` needs. It does not own HTTP/gRPC,
back-pressure, de-duplication or writing.

Values are decoded to what the Python SDK holds for the same span, so both paths give equal rows:
strings, ints, floats and bools as themselves, arrays as lists, key-value lists as dicts, an empty
``AnyValue`` as ``None``, and ``bytesValue`` as its base64 text (the form OTLP/JSON uses).

Validation is per span, never per request: a span with a bad id, a missing name, times outside what
a ``timestamp[ns]`` column holds, an unknown kind or status code, or content that does not parse is
rejected and counted with a reason, and the rest of the request is kept. A body whose outer layers
are not a request (bad protobuf framing, not JSON) raises ``OtlpDecodeError``. Count limits are the
SDK's span limits (``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``, ...; 128 by default), applied to resource
attributes too; values longer than ``TRACELEARN_MAX_ATTRIBUTE_BYTES`` are cut and counted by
``SpanColumns``. Protobuf is parsed one span at a time (``otlp_wire``), so parser memory stays
bounded whatever the body holds.

Nothing from the input is executed: protobuf is parsed by upb, JSON by orjson, into plain values.

May import: tracelearn.collector.otlp_spans, otlp_wire, otlp_json, span_rows; protobuf messages.
"""

import base64
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from google.protobuf.message import DecodeError

from tracelearn.collector.otlp_json import decode_json, json_records
from tracelearn.collector.otlp_spans import (
    DEFAULT_LIMITS,
    SPAN_KINDS,
    STATUS_CODES,
    DecodedSpans,
    DecodeLimits,
    InvalidSpanError,
    OtlpDecodeError,
    check_enums,
    check_event_time,
    check_times,
    limited,
    span_label,
)
from tracelearn.collector.otlp_wire import (
    Body,
    DenseMessageError,
    RequestLayout,
    WireFormatError,
    field_text,
    parse_key_values,
    parse_span,
    request_layout,
)
from tracelearn.collector.span_rows import SpanEvent, SpanLink, SpanRecord

__all__ = [
    "DEFAULT_LIMITS",
    "JSON_CONTENT_TYPE",
    "PROTOBUF_CONTENT_TYPE",
    "DecodeLimits",
    "DecodedSpans",
    "OtlpDecodeError",
    "decode_json",
    "decode_protobuf",
    "decode_request",
    "request_records",
]

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
JSON_CONTENT_TYPE = "application/json"


def _pb_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bool_value":
        return value.bool_value
    if which == "array_value":
        return [_pb_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return None


_PB_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def _pb_attributes(kvs: Any) -> dict[str, Any]:
    # The per-attribute hot loop: scalars (nearly all values) are read without a function call, and
    # a non-empty string (most of them) without asking which field is set: a oneof's unset string
    # reads as "", so a non-empty one is the value (decoding an LLM span: 31.9 -> 29.5 us here).
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        text = value.string_value
        if text:
            out[kv.key] = text
            continue
        which = value.WhichOneof("value")
        out[kv.key] = getattr(value, which) if which in _PB_SCALARS else _pb_value(value)
    return out


def _pb_id(raw: bytes, size: int, what: str) -> int:
    if len(raw) != size:
        raise InvalidSpanError(f"{what} is {len(raw)} bytes, expected {size}")
    value = int.from_bytes(raw, "big")
    if value == 0:
        raise InvalidSpanError(f"{what} is all zeros")
    return value


def check_pb_span(span: Any) -> None:
    """Raise ``InvalidSpanError`` naming the field when the parsed protobuf span cannot become a row."""
    if not span.name:
        raise InvalidSpanError("name is missing")
    _pb_id(span.trace_id, 16, "trace_id")
    _pb_id(span.span_id, 8, "span_id")
    parent = span.parent_span_id
    if parent and len(parent) != 8:
        raise InvalidSpanError(f"parent_span_id is {len(parent)} bytes, expected 8")
    check_times(span.start_time_unix_nano, span.end_time_unix_nano)
    check_enums(span.kind, span.status.code)
    for position, event in enumerate(span.events):
        check_event_time(event.time_unix_nano, f"events[{position}].time_unix_nano")
    for position, link in enumerate(span.links):
        _pb_id(link.trace_id, 16, f"links[{position}].trace_id")
        _pb_id(link.span_id, 8, f"links[{position}].span_id")


def _beyond(count: int, limit: int | None) -> int:
    return count - limit if limit is not None and count > limit else 0


def dropped_items(span: Any, limits: DecodeLimits) -> int:
    """How many attributes, events and links of ``span`` the count limits leave out (what decoding drops)."""
    dropped = _beyond(len(span.attributes), limits.max_attributes)
    events, links = span.events, span.links
    if events:
        dropped += _beyond(len(events), limits.max_events)
        kept = events if limits.max_events is None else events[: limits.max_events]
        dropped += sum(_beyond(len(event.attributes), limits.max_event_attributes) for event in kept)
    if links:
        dropped += _beyond(len(links), limits.max_links)
        kept = links if limits.max_links is None else links[: limits.max_links]
        dropped += sum(_beyond(len(link.attributes), limits.max_link_attributes) for link in kept)
    return dropped


def _pb_record(
    span: Any, resource: Mapping[str, Any], scope_name: str | None, limits: DecodeLimits, out: DecodedSpans
) -> SpanRecord:
    check_pb_span(span)
    events: list[SpanEvent] = [
        (event.name, event.time_unix_nano, _pb_attributes(limited(event.attributes, limits.max_event_attributes, out)))
        for event in limited(span.events, limits.max_events, out)
    ]
    links: list[SpanLink] = [
        (
            int.from_bytes(link.trace_id, "big"),
            int.from_bytes(link.span_id, "big"),
            _pb_attributes(limited(link.attributes, limits.max_link_attributes, out)),
        )
        for link in limited(span.links, limits.max_links, out)
    ]
    status = span.status
    return SpanRecord(
        trace_id=int.from_bytes(span.trace_id, "big"),
        span_id=int.from_bytes(span.span_id, "big"),
        # Some exporters send eight zero bytes for "no parent".
        parent_span_id=int.from_bytes(span.parent_span_id, "big") or None,
        name=span.name,
        kind=SPAN_KINDS[span.kind],
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        status_code=STATUS_CODES[status.code],
        status_message=status.message or None,
        resource=resource,
        scope_name=scope_name,
        attributes=_pb_attributes(limited(span.attributes, limits.max_attributes, out)),
        events=events,
        links=links,
    )


def protobuf_layout(body: Body, reserve: Callable[[int], None] | None = None) -> RequestLayout:
    """Where the resources, scopes and spans of a protobuf request lie; raises ``OtlpDecodeError``.

    ``reserve`` is asked for the layout's memory as it grows (see ``otlp_wire.request_layout``).
    """
    try:
        return request_layout(body, reserve)
    except WireFormatError as exc:
        raise OtlpDecodeError(
            f"the body ({len(body)} bytes) is not a protobuf ExportTraceServiceRequest: {exc}"
        ) from None


def resource_attributes(body: Body, where: tuple[int, int] | None, limits: DecodeLimits, out: DecodedSpans) -> dict[
    str, Any
]:
    """The attributes of the ``Resource`` at ``where`` in ``body`` (the first ``max_attributes``).

    Raises ``InvalidSpanError`` when they cannot be read (every span under the resource goes).
    """
    if where is None:
        return {}
    try:
        kvs, dropped = parse_key_values(body, *where, limits.max_attributes)
        out.dropped_items += dropped
        return _pb_attributes(kvs)
    except (DecodeError, DenseMessageError, WireFormatError) as exc:
        raise InvalidSpanError(f"the resource's attributes cannot be read: {exc}") from None
    except RecursionError:
        raise InvalidSpanError("the resource's attribute values nest too deeply") from None


def scope_name_of(body: Body, where: tuple[int, int] | None) -> str | None:
    """The name of the ``InstrumentationScope`` at ``where``; raises ``InvalidSpanError`` if unreadable."""
    if where is None:
        return None
    try:
        return field_text(body, *where, 1) or None
    except (UnicodeDecodeError, WireFormatError) as exc:
        raise InvalidSpanError(f"the instrumentation scope's name cannot be read: {exc}") from None


def parsed_span(body: Body, start: int, end: int, position: int) -> Any:
    """The protobuf span at ``body[start:end]``; raises ``InvalidSpanError`` naming it when it does not parse."""
    try:
        return parse_span(body, start, end)
    except (DecodeError, DenseMessageError) as exc:
        raise InvalidSpanError(f"span #{position} (bytes {start}..{end}) does not parse: {exc}") from None


def protobuf_records(
    body: Body, limits: DecodeLimits, out: DecodedSpans, skip: Collection[int] = ()
) -> Iterator[tuple[int, SpanRecord]]:
    """The accepted spans of a protobuf request as (position in the request, record), in order.

    Spans are parsed one at a time; those at positions in ``skip`` are passed over unparsed.
    Rejections and dropped items go to ``out``. Raises ``OtlpDecodeError`` (before yielding) when
    the body's framing is not a request.
    """
    return _protobuf_records(body, protobuf_layout(body), limits, out, skip)


def _protobuf_records(
    body: Body, layout: RequestLayout, limits: DecodeLimits, out: DecodedSpans, skip: Collection[int]
) -> Iterator[tuple[int, SpanRecord]]:
    position = 0
    for resource_layout in layout.resources:
        try:
            resource: dict[str, Any] | None = resource_attributes(body, resource_layout.resource, limits, out)
            problem = ""
        except InvalidSpanError as exc:
            resource, problem = None, str(exc)
        for scope in resource_layout.scopes:
            scope_problem = problem
            scope_name = None
            if not scope_problem:
                try:
                    scope_name = scope_name_of(body, scope.scope)
                except InvalidSpanError as exc:
                    scope_problem = str(exc)
            for start, end in zip(scope.starts, scope.ends, strict=True):
                if position in skip:
                    position += 1
                    continue
                if scope_problem or resource is None:
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
                    record = _pb_record(span, resource, scope_name, limits, out)
                except InvalidSpanError as exc:
                    out.reject(f"{span_label(position, span.name, span.span_id)}: {exc}")
                except RecursionError:
                    out.reject(f"{span_label(position, span.name, span.span_id)}: attribute values nest too deeply")
                else:
                    yield position, record
                position += 1


def decode_protobuf(body: Body, limits: DecodeLimits | None = None) -> DecodedSpans:
    """An ``ExportTraceServiceRequest`` in protobuf encoding as accepted records and rejections.

    Raises ``OtlpDecodeError`` when ``body``'s framing is not that message.
    """
    out = DecodedSpans()
    for position, record in protobuf_records(body, limits or DEFAULT_LIMITS, out):
        out.records.append(record)
        out.positions.append(position)
    return out


def media_type_of(content_type: str) -> str:
    """The media type of an HTTP ``Content-Type`` (parameters such as ``; charset=utf-8`` dropped), lower case."""
    return content_type.split(";", 1)[0].strip().lower()


def request_records(
    body: Body, content_type: str, limits: DecodeLimits, out: DecodedSpans, skip: Collection[int] = ()
) -> Iterator[tuple[int, SpanRecord]]:
    """``protobuf_records`` or ``json_records`` by ``Content-Type``; raises ``OtlpDecodeError`` for other types."""
    media_type = media_type_of(content_type)
    if media_type == PROTOBUF_CONTENT_TYPE:
        return protobuf_records(body, limits, out, skip)
    if media_type == JSON_CONTENT_TYPE:
        return json_records(body, limits, out, skip)
    raise OtlpDecodeError(
        f"Content-Type {content_type!r} is not an OTLP encoding; use {PROTOBUF_CONTENT_TYPE} or {JSON_CONTENT_TYPE}"
    )


def decode_request(body: Body, content_type: str, limits: DecodeLimits | None = None) -> DecodedSpans:
    """Decode by HTTP ``Content-Type`` (parameters such as ``; charset=utf-8`` are ignored)."""
    out = DecodedSpans()
    for position, record in request_records(body, content_type, limits or DEFAULT_LIMITS, out):
        out.records.append(record)
        out.positions.append(position)
    return out
