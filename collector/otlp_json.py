"""OTLP/JSON trace request bodies decoded into ``SpanRecord``s, span by span.

OTLP/JSON is protobuf's JSON mapping with two OTLP rules: trace and span ids are hex (not base64),
and int64 fields may be strings or numbers. Fields may be spelled camelCase or snake_case. A span
with a field of the wrong type is rejected with a reason naming the field; a body whose outer
structure is not resourceSpans/scopeSpans/spans raises ``OtlpDecodeError``. Parsed by orjson into
plain values: nothing from the input is executed.

May import: tracelearn.collector.otlp_spans and span_rows, orjson.
"""

import base64
import binascii
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import orjson

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
from tracelearn.collector.otlp_wire import Body
from tracelearn.collector.span_rows import SpanEvent, SpanLink, SpanRecord

# Proto3 JSON also allows enums by name.
_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _get(obj: dict[str, Any], camel: str, snake: str) -> Any:
    """Field ``camel`` of a JSON object, or its snake_case spelling (the spec lets receivers accept both)."""
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _json_int(value: Any, what: str) -> int:
    # int64 fields are JSON strings in proto3 JSON, but numbers are accepted too.
    if type(value) is int:
        return value
    if type(value) is str:
        try:
            return int(value)
        except ValueError:
            pass
    elif type(value) is float and value.is_integer():
        return int(value)
    raise InvalidSpanError(f"{what} {value!r} is not an integer")


def _json_float(value: Any, what: str) -> float:
    # Proto3 JSON writes non-finite doubles as "NaN", "Infinity", "-Infinity".
    if type(value) is float or type(value) is int:
        return float(value)
    if type(value) is str:
        try:
            return float(value)
        except ValueError:
            pass
    raise InvalidSpanError(f"{what} {value!r} is not a number")


def _json_bool(value: Any, what: str) -> bool:
    if type(value) is bool:
        return value
    raise InvalidSpanError(f"{what} {value!r} is not true or false")


def _json_string(value: Any, what: str) -> str:
    if type(value) is str:
        return value
    raise InvalidSpanError(f"{what} {value!r} is not a string")


def _json_bytes(value: Any, what: str) -> str:
    # Stored as the base64 text it arrives as, checked and normalized (protobuf bytes get the same text).
    if type(value) is str:
        try:
            return base64.b64encode(base64.b64decode(value, validate=True)).decode("ascii")
        except (binascii.Error, ValueError):
            pass
    raise InvalidSpanError(f"{what} {value!r} is not base64")


def _json_array(value: Any, what: str) -> list[Any]:
    if type(value) is not dict:
        raise InvalidSpanError(f"{what}: arrayValue {value!r} is not an object")
    values = value.get("values")
    if values is None:
        return []
    if type(values) is not list:
        raise InvalidSpanError(f"{what}: arrayValue.values is not a list")
    return [_json_value(item, what) for item in values]


def _json_kvlist(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise InvalidSpanError(f"{what}: kvlistValue {value!r} is not an object")
    return _json_attributes(value.get("values"), what)


_JSON_VALUE_KINDS: dict[str, Callable[[Any, str], Any]] = {
    "stringValue": _json_string,
    "intValue": _json_int,
    "doubleValue": _json_float,
    "boolValue": _json_bool,
    "arrayValue": _json_array,
    "kvlistValue": _json_kvlist,
    "bytesValue": _json_bytes,
}


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


_JSON_VALUE_KINDS.update({_snake(name): kind for name, kind in list(_JSON_VALUE_KINDS.items())})


def _json_value(value: Any, what: str) -> Any:
    """An OTLP/JSON ``AnyValue`` object as a plain value (``None`` for an empty one)."""
    if type(value) is not dict:
        raise InvalidSpanError(f"{what}: value {value!r} is not an AnyValue object")
    for key, item in value.items():
        kind = _JSON_VALUE_KINDS.get(key)
        if kind is not None:
            return kind(item, f"{what} {key}")
    return None


def _json_attributes(kvs: Any, what: str) -> dict[str, Any]:
    """A JSON list of ``{"key", "value"}`` objects as a dict (the per-attribute hot loop)."""
    if kvs is None:
        return {}
    if type(kvs) is not list:
        raise InvalidSpanError(f"{what} is not a list")
    out: dict[str, Any] = {}
    for kv in kvs:
        if type(kv) is not dict:
            raise InvalidSpanError(f"{what}: {kv!r} is not a key-value object")
        key = kv.get("key")
        if type(key) is not str:
            raise InvalidSpanError(f"{what}: key {key!r} is not a string")
        value = kv.get("value")
        if value is None:
            out[key] = None
            continue
        text = value.get("stringValue") if type(value) is dict else None
        out[key] = text if type(text) is str else _json_value(value, f"{what}[{key!r}]")
    return out


def _json_limited_list(value: Any, what: str, limit: int | None, out: DecodedSpans) -> Sequence[Any]:
    if value is None:
        return ()
    if type(value) is not list:
        raise InvalidSpanError(f"{what} is not a list")
    return limited(value, limit, out)


def _json_attributes_limited(value: Any, what: str, limit: int | None, out: DecodedSpans) -> dict[str, Any]:
    if value is None:
        return {}
    return _json_attributes(_json_limited_list(value, what, limit, out), what)


def _hex_id(value: Any, size: int, what: str) -> int:
    """A trace or span id in OTLP/JSON: hex text (not base64, unlike generic protobuf JSON)."""
    if value is None or value == "":
        raise InvalidSpanError(f"{what} is missing")
    if type(value) is not str:
        raise InvalidSpanError(f"{what} {value!r} is not a hex string")
    if len(value) != 2 * size:
        hint = " (base64? OTLP/JSON ids are hex)" if len(value) == 4 * ((size + 2) // 3) else ""
        raise InvalidSpanError(f"{what} {value!r} is {len(value)} characters, expected {2 * size} hex digits{hint}")
    try:
        # fromhex skips whitespace, so with the length checked above 'size' bytes means only hex digits.
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise InvalidSpanError(f"{what} {value!r} is not hex")
    number = int.from_bytes(raw, "big")
    if number == 0:
        raise InvalidSpanError(f"{what} is all zeros")
    return number


def _json_enum(value: Any, names: Mapping[str, int], what: str) -> int:
    if value is None:
        return 0
    if type(value) is int:
        return value
    if type(value) is str and value in names:
        return names[value]
    raise InvalidSpanError(f"{what} {value!r} is not a known value")


def _json_time(value: Any, what: str) -> int:
    if value is None:
        return 0
    number = _json_int(value, what)
    if number < 0:
        raise InvalidSpanError(f"{what} {number} is negative")
    return number


def _json_span(
    span: dict[str, Any], resource: Mapping[str, Any], scope_name: str | None, limits: DecodeLimits, out: DecodedSpans
) -> SpanRecord:
    name = span.get("name")
    if not name:
        raise InvalidSpanError("name is missing")
    if type(name) is not str:
        raise InvalidSpanError(f"name {name!r} is not a string")
    trace_id = _hex_id(_get(span, "traceId", "trace_id"), 16, "traceId")
    span_id = _hex_id(_get(span, "spanId", "span_id"), 8, "spanId")
    parent_text = _get(span, "parentSpanId", "parent_span_id")
    # Absent, empty or eight zero bytes all mean "root span".
    parent_span_id = None
    if parent_text is not None and parent_text != "" and parent_text != "0000000000000000":
        parent_span_id = _hex_id(parent_text, 8, "parentSpanId")
    start_ns = _json_time(_get(span, "startTimeUnixNano", "start_time_unix_nano"), "startTimeUnixNano")
    end_ns = _json_time(_get(span, "endTimeUnixNano", "end_time_unix_nano"), "endTimeUnixNano")
    check_times(start_ns, end_ns)
    kind = _json_enum(span.get("kind"), _KIND_NAMES, "kind")
    status = span.get("status")
    code, message = 0, None
    if status is not None:
        if type(status) is not dict:
            raise InvalidSpanError(f"status {status!r} is not an object")
        code = _json_enum(status.get("code"), _STATUS_NAMES, "status.code")
        message = status.get("message")
        if message is not None and type(message) is not str:
            raise InvalidSpanError(f"status.message {message!r} is not a string")
    check_enums(kind, code)
    events: list[SpanEvent] = []
    for position, event in enumerate(_json_limited_list(span.get("events"), "events", limits.max_events, out)):
        where = f"events[{position}]"
        if type(event) is not dict:
            raise InvalidSpanError(f"{where} is not an object")
        event_time = _json_time(_get(event, "timeUnixNano", "time_unix_nano"), f"{where}.timeUnixNano")
        check_event_time(event_time, f"{where}.timeUnixNano")
        events.append(
            (
                _json_string(event.get("name", ""), f"{where}.name"),
                event_time,
                _json_attributes_limited(
                    event.get("attributes"), f"{where}.attributes", limits.max_event_attributes, out
                ),
            )
        )
    links: list[SpanLink] = []
    for position, link in enumerate(_json_limited_list(span.get("links"), "links", limits.max_links, out)):
        where = f"links[{position}]"
        if type(link) is not dict:
            raise InvalidSpanError(f"{where} is not an object")
        links.append(
            (
                _hex_id(_get(link, "traceId", "trace_id"), 16, f"{where}.traceId"),
                _hex_id(_get(link, "spanId", "span_id"), 8, f"{where}.spanId"),
                _json_attributes_limited(
                    link.get("attributes"), f"{where}.attributes", limits.max_link_attributes, out
                ),
            )
        )
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent_span_id,
        name=name,
        kind=SPAN_KINDS[kind],
        start_ns=start_ns,
        end_ns=end_ns,
        status_code=STATUS_CODES[code],
        status_message=message or None,
        resource=resource,
        scope_name=scope_name,
        attributes=_json_attributes_limited(span.get("attributes"), "attributes", limits.max_attributes, out),
        events=events,
        links=links,
    )


def _json_list(obj: dict[str, Any], camel: str, snake: str, where: str) -> list[Any]:
    """A structural list of the request (resourceSpans, scopeSpans, spans); absent means empty."""
    value = _get(obj, camel, snake)
    if value is None:
        return []
    if type(value) is not list:
        raise OtlpDecodeError(f"{where}.{camel} is {type(value).__name__}, expected a list")
    for position, item in enumerate(value):
        if type(item) is not dict:
            raise OtlpDecodeError(f"{where}.{camel}[{position}] is {type(item).__name__}, expected an object")
    return value


def json_records(
    body: Body, limits: DecodeLimits, out: DecodedSpans, skip: Collection[int] = ()
) -> Iterator[tuple[int, SpanRecord]]:
    """The accepted spans of an OTLP/JSON request as (position in the request, record), in order.

    Spans at positions in ``skip`` are passed over unread; rejections and dropped items go to
    ``out``. Raises ``OtlpDecodeError`` (before yielding anything) when ``body`` is not JSON or its
    outer structure is not a request.
    """
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpDecodeError(f"the body ({len(body)} bytes) is not valid JSON: {exc}") from None
    if type(request) is not dict:
        raise OtlpDecodeError(
            f"the body is a JSON {type(request).__name__}, expected an ExportTraceServiceRequest object"
        )
    # The outer structure is checked whole first, so that a malformed body raises before any span is used.
    resources = _json_list(request, "resourceSpans", "resource_spans", "request")
    layout = [
        [
            (scope_spans, _json_list(scope_spans, "spans", "spans", f"resourceSpans[{r}].scopeSpans[{s}]"))
            for s, scope_spans in enumerate(
                _json_list(resource_spans, "scopeSpans", "scope_spans", f"resourceSpans[{r}]")
            )
        ]
        for r, resource_spans in enumerate(resources)
    ]
    return _json_records(resources, layout, limits, out, skip)


def _json_records(
    resources: list[Any],
    layout: list[list[tuple[Any, list[Any]]]],
    limits: DecodeLimits,
    out: DecodedSpans,
    skip: Collection[int],
) -> Iterator[tuple[int, SpanRecord]]:
    index = 0
    for rs_position, (resource_spans, scopes) in enumerate(zip(resources, layout, strict=True)):
        where = f"resourceSpans[{rs_position}]"
        resource: dict[str, Any] | None = None
        resource_error = ""
        try:
            resource_obj = resource_spans.get("resource")
            if resource_obj is not None and type(resource_obj) is not dict:
                raise InvalidSpanError(f"{where}.resource is not an object")
            resource = _json_attributes_limited(
                (resource_obj or {}).get("attributes"), f"{where}.resource.attributes", limits.max_attributes, out
            )
        except (InvalidSpanError, RecursionError) as exc:
            resource_error = str(exc) or "resource attributes nest too deeply"
        for ss_position, (scope_spans, spans) in enumerate(scopes):
            scope_where = f"{where}.scopeSpans[{ss_position}]"
            scope = scope_spans.get("scope")
            scope_name = scope.get("name") if type(scope) is dict else None
            problem = resource_error
            if not problem and scope_name is not None and type(scope_name) is not str:
                problem = f"{scope_where}.scope.name {scope_name!r} is not a string"
            if problem or resource is None:
                # Every span under a bad resource or scope goes, each counted.
                kept = sum(1 for position in range(index, index + len(spans)) if position not in skip)
                if kept:
                    out.reject(f"{kept} span(s) under {scope_where}: {problem}", spans=kept)
                index += len(spans)
                continue
            for span in spans:
                if index not in skip:
                    try:
                        record = _json_span(span, resource, scope_name or None, limits, out)
                    except InvalidSpanError as exc:
                        out.reject(f"{span_label(index, span.get('name'), _get(span, 'spanId', 'span_id'))}: {exc}")
                    except RecursionError:
                        label = span_label(index, span.get("name"), _get(span, "spanId", "span_id"))
                        out.reject(f"{label}: attribute values nest too deeply")
                    else:
                        yield index, record
                index += 1


def decode_json(body: Body, limits: DecodeLimits | None = None) -> DecodedSpans:
    """An ``ExportTraceServiceRequest`` in OTLP/JSON encoding as accepted records and rejections.

    Raises ``OtlpDecodeError`` when ``body`` is not JSON or its outer structure is not a request.
    """
    out = DecodedSpans()
    for position, record in json_records(body, limits or DEFAULT_LIMITS, out):
        out.records.append(record)
        out.positions.append(position)
    return out
