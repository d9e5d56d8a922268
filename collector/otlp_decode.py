"""OTLP trace request bodies (protobuf or OTLP/JSON) decoded into ``SpanRecord``s of the spans table.

Owns the first step of the collector sidecar: bytes of an ``ExportTraceServiceRequest`` in, accepted
``SpanRecord``s (the neutral form ``span_rows.SpanColumns`` turns into rows, exactly as it does for the
in-process exporter's SDK spans) plus what OTLP's ``partial_success`` needs out. It does not own
HTTP/gRPC, back-pressure, de-duplication or writing: the receiver composes this with ``SpanColumns``,
the spool and the Parquet writer.

Values are decoded to what the Python SDK holds for the same span, so both paths give equal rows:
strings, ints, floats and bools as themselves, arrays as lists, key-value lists as dicts, an empty
``AnyValue`` as ``None``, and ``bytesValue`` as its base64 text (the form OTLP/JSON uses).

Validation is per span, never per request: a span with a bad id, a missing name, impossible times,
an unknown kind or status code, or (JSON) a field of the wrong type is rejected and counted with a
reason, and the rest of the request is kept. A body that is not a request at all (bad protobuf, not
JSON, JSON whose outer structure is not resourceSpans/scopeSpans/spans) raises ``OtlpDecodeError``.
Count limits are the SDK's span limits (``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``, ``OTEL_SPAN_EVENT_COUNT_LIMIT``,
...; 128 by default), which the in-process path gets from the SDK itself; values longer than
``TRACELEARN_MAX_ATTRIBUTE_BYTES`` are cut and counted by ``SpanColumns`` on both paths.

Nothing from the input is executed: protobuf is parsed by upb, JSON by orjson, into plain values.
"""

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import SpanLimits

from tracelearn.collector.span_rows import SpanEvent, SpanLink, SpanRecord

# OTLP enum value -> the SDK enum member name that ``from_readable_span`` stores. OTLP numbers kinds
# from UNSPECIFIED=0, which the spec lets a receiver read as INTERNAL.
SPAN_KINDS: tuple[str, ...] = ("INTERNAL", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
STATUS_CODES: tuple[str, ...] = ("UNSET", "OK", "ERROR")
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

MAX_UNIX_NANO = 2**64 - 1
# How many rejection reasons the error message spells out; the rest are counted.
MAX_REASONS = 5


class OtlpDecodeError(ValueError):
    """The body is not an OTLP trace export request (the receiver answers 400 with this message)."""


class _InvalidSpanError(Exception):
    """One span (or every span under one resource or scope) cannot become a row; ``str`` is why."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Count limits per span; ``None`` means unlimited. Extra items are dropped (the first ones are kept)."""

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


@dataclass(slots=True)
class DecodedSpans:
    """What one request body yielded: the accepted spans, and what was rejected or dropped and why."""

    records: list[SpanRecord] = field(default_factory=list)
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
        parts = []
        if self.rejected_spans:
            shown = "; ".join(self.reasons)
            more = self.rejected_spans - len(self.reasons)
            parts.append(
                f"rejected {self.rejected_spans} span(s): {shown}" + (f"; and {more} more" if more > 0 else "")
            )
        if self.dropped_items:
            parts.append(
                f"dropped {self.dropped_items} attribute(s)/event(s)/link(s) beyond the span limits "
                "(OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_SPAN_EVENT_COUNT_LIMIT, OTEL_SPAN_LINK_COUNT_LIMIT)"
            )
        return "; ".join(parts)


def _limited(items: Sequence[Any], limit: int | None, out: DecodedSpans) -> Sequence[Any]:
    if limit is None or len(items) <= limit:
        return items
    out.dropped_items += len(items) - limit
    return items[:limit]


def _span_label(index: int, name: Any, span_id: Any) -> str:
    ident = span_id.hex() if isinstance(span_id, bytes) else str(span_id)
    return f"span #{index} {name!r} (span_id {ident or '<empty>'})"


# ---------------------------------------------------------------------------------------------------
# protobuf


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
    # The per-attribute hot loop: scalars (nearly all values) are read without a function call.
    out: dict[str, Any] = {}
    for kv in kvs:
        value = kv.value
        which = value.WhichOneof("value")
        out[kv.key] = getattr(value, which) if which in _PB_SCALARS else _pb_value(value)
    return out


def _pb_id(raw: bytes, size: int, what: str) -> int:
    if len(raw) != size:
        raise _InvalidSpanError(f"{what} is {len(raw)} bytes, expected {size}")
    value = int.from_bytes(raw, "big")
    if value == 0:
        raise _InvalidSpanError(f"{what} is all zeros")
    return value


def _pb_span(
    span: Any, resource: Mapping[str, Any], scope_name: str | None, limits: DecodeLimits, out: DecodedSpans
) -> SpanRecord:
    name = span.name
    if not name:
        raise _InvalidSpanError("name is missing")
    trace_id = _pb_id(span.trace_id, 16, "trace_id")
    span_id = _pb_id(span.span_id, 8, "span_id")
    parent_raw = span.parent_span_id
    parent_span_id: int | None = None
    if parent_raw:
        if len(parent_raw) != 8:
            raise _InvalidSpanError(f"parent_span_id is {len(parent_raw)} bytes, expected 8")
        # Some exporters send eight zero bytes for "no parent".
        parent_span_id = int.from_bytes(parent_raw, "big") or None
    start_ns, end_ns = span.start_time_unix_nano, span.end_time_unix_nano
    _check_times(start_ns, end_ns)
    kind = span.kind
    if not 0 <= kind < len(SPAN_KINDS):
        raise _InvalidSpanError(f"kind {kind} is not an OTLP SpanKind")
    status = span.status
    code = status.code
    if not 0 <= code < len(STATUS_CODES):
        raise _InvalidSpanError(f"status.code {code} is not an OTLP StatusCode")
    events: list[SpanEvent] = []
    for event in _limited(span.events, limits.max_events, out):
        events.append(
            (
                event.name,
                event.time_unix_nano,
                _pb_attributes(_limited(event.attributes, limits.max_event_attributes, out)),
            )
        )
    links: list[SpanLink] = []
    for position, link in enumerate(_limited(span.links, limits.max_links, out)):
        links.append(
            (
                _pb_id(link.trace_id, 16, f"links[{position}].trace_id"),
                _pb_id(link.span_id, 8, f"links[{position}].span_id"),
                _pb_attributes(_limited(link.attributes, limits.max_link_attributes, out)),
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
        status_message=status.message or None,
        resource=resource,
        scope_name=scope_name,
        attributes=_pb_attributes(_limited(span.attributes, limits.max_attributes, out)),
        events=events,
        links=links,
    )


def _check_times(start_ns: int, end_ns: int) -> None:
    if start_ns <= 0:
        raise _InvalidSpanError("start_time_unix_nano is missing")
    if end_ns < start_ns:
        raise _InvalidSpanError(f"end_time_unix_nano {end_ns} is before start_time_unix_nano {start_ns}")


def decode_protobuf(body: bytes, limits: DecodeLimits | None = None) -> DecodedSpans:
    """An ``ExportTraceServiceRequest`` in protobuf encoding as accepted records and rejections.

    Raises ``OtlpDecodeError`` when ``body`` does not parse as that message.
    """
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OtlpDecodeError(
            f"the body ({len(body)} bytes) is not a protobuf ExportTraceServiceRequest: {exc}"
        ) from None
    limits = limits or DEFAULT_LIMITS
    out = DecodedSpans()
    index = 0
    for resource_spans in request.resource_spans:
        resource = _pb_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name or None
            for span in scope_spans.spans:
                try:
                    out.records.append(_pb_span(span, resource, scope_name, limits, out))
                except _InvalidSpanError as exc:
                    out.reject(f"{_span_label(index, span.name, span.span_id)}: {exc}")
                except RecursionError:
                    out.reject(f"{_span_label(index, span.name, span.span_id)}: attribute values nest too deeply")
                index += 1
    return out


# ---------------------------------------------------------------------------------------------------
# OTLP/JSON


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
    raise _InvalidSpanError(f"{what} {value!r} is not an integer")


def _json_float(value: Any, what: str) -> float:
    # Proto3 JSON writes non-finite doubles as "NaN", "Infinity", "-Infinity".
    if type(value) is float or type(value) is int:
        return float(value)
    if type(value) is str:
        try:
            return float(value)
        except ValueError:
            pass
    raise _InvalidSpanError(f"{what} {value!r} is not a number")


def _json_bool(value: Any, what: str) -> bool:
    if type(value) is bool:
        return value
    raise _InvalidSpanError(f"{what} {value!r} is not true or false")


def _json_string(value: Any, what: str) -> str:
    if type(value) is str:
        return value
    raise _InvalidSpanError(f"{what} {value!r} is not a string")


def _json_bytes(value: Any, what: str) -> str:
    # Stored as the base64 text it arrives as, checked and normalized (protobuf bytes get the same text).
    if type(value) is str:
        try:
            return base64.b64encode(base64.b64decode(value, validate=True)).decode("ascii")
        except (binascii.Error, ValueError):
            pass
    raise _InvalidSpanError(f"{what} {value!r} is not base64")


def _json_array(value: Any, what: str) -> list[Any]:
    if type(value) is not dict:
        raise _InvalidSpanError(f"{what}: arrayValue {value!r} is not an object")
    values = value.get("values")
    if values is None:
        return []
    if type(values) is not list:
        raise _InvalidSpanError(f"{what}: arrayValue.values is not a list")
    return [_json_value(item, what) for item in values]


def _json_kvlist(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _InvalidSpanError(f"{what}: kvlistValue {value!r} is not an object")
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
        raise _InvalidSpanError(f"{what}: value {value!r} is not an AnyValue object")
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
        raise _InvalidSpanError(f"{what} is not a list")
    out: dict[str, Any] = {}
    for kv in kvs:
        if type(kv) is not dict:
            raise _InvalidSpanError(f"{what}: {kv!r} is not a key-value object")
        key = kv.get("key")
        if type(key) is not str:
            raise _InvalidSpanError(f"{what}: key {key!r} is not a string")
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
        raise _InvalidSpanError(f"{what} is not a list")
    return _limited(value, limit, out)


def _json_attributes_limited(value: Any, what: str, limit: int | None, out: DecodedSpans) -> dict[str, Any]:
    if value is None:
        return {}
    return _json_attributes(_json_limited_list(value, what, limit, out), what)


def _hex_id(value: Any, size: int, what: str) -> int:
    """A trace or span id in OTLP/JSON: hex text (not base64, unlike generic protobuf JSON)."""
    if value is None or value == "":
        raise _InvalidSpanError(f"{what} is missing")
    if type(value) is not str:
        raise _InvalidSpanError(f"{what} {value!r} is not a hex string")
    if len(value) != 2 * size:
        hint = " (base64? OTLP/JSON ids are hex)" if len(value) == 4 * ((size + 2) // 3) else ""
        raise _InvalidSpanError(f"{what} {value!r} is {len(value)} characters, expected {2 * size} hex digits{hint}")
    try:
        # fromhex skips whitespace, so with the length checked above 'size' bytes means only hex digits.
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise _InvalidSpanError(f"{what} {value!r} is not hex")
    number = int.from_bytes(raw, "big")
    if number == 0:
        raise _InvalidSpanError(f"{what} is all zeros")
    return number


def _json_enum(value: Any, names: Mapping[str, int], what: str) -> int:
    if value is None:
        return 0
    if type(value) is int:
        return value
    if type(value) is str and value in names:
        return names[value]
    raise _InvalidSpanError(f"{what} {value!r} is not a known value")


def _json_time(value: Any, what: str) -> int:
    if value is None:
        return 0
    number = _json_int(value, what)
    if not 0 <= number <= MAX_UNIX_NANO:
        raise _InvalidSpanError(f"{what} {number} is out of range")
    return number


def _json_span(
    span: dict[str, Any], resource: Mapping[str, Any], scope_name: str | None, limits: DecodeLimits, out: DecodedSpans
) -> SpanRecord:
    name = span.get("name")
    if not name:
        raise _InvalidSpanError("name is missing")
    if type(name) is not str:
        raise _InvalidSpanError(f"name {name!r} is not a string")
    trace_id = _hex_id(_get(span, "traceId", "trace_id"), 16, "traceId")
    span_id = _hex_id(_get(span, "spanId", "span_id"), 8, "spanId")
    parent_text = _get(span, "parentSpanId", "parent_span_id")
    # Absent, empty or eight zero bytes all mean "root span".
    parent_span_id = None
    if parent_text is not None and parent_text != "" and parent_text != "0000000000000000":
        parent_span_id = _hex_id(parent_text, 8, "parentSpanId")
    start_ns = _json_time(_get(span, "startTimeUnixNano", "start_time_unix_nano"), "startTimeUnixNano")
    end_ns = _json_time(_get(span, "endTimeUnixNano", "end_time_unix_nano"), "endTimeUnixNano")
    _check_times(start_ns, end_ns)
    kind = _json_enum(span.get("kind"), _KIND_NAMES, "kind")
    if not 0 <= kind < len(SPAN_KINDS):
        raise _InvalidSpanError(f"kind {kind} is not an OTLP SpanKind")
    status = span.get("status")
    code, message = 0, None
    if status is not None:
        if type(status) is not dict:
            raise _InvalidSpanError(f"status {status!r} is not an object")
        code = _json_enum(status.get("code"), _STATUS_NAMES, "status.code")
        if not 0 <= code < len(STATUS_CODES):
            raise _InvalidSpanError(f"status.code {code} is not an OTLP StatusCode")
        message = status.get("message")
        if message is not None and type(message) is not str:
            raise _InvalidSpanError(f"status.message {message!r} is not a string")
    events: list[SpanEvent] = []
    for position, event in enumerate(_json_limited_list(span.get("events"), "events", limits.max_events, out)):
        where = f"events[{position}]"
        if type(event) is not dict:
            raise _InvalidSpanError(f"{where} is not an object")
        events.append(
            (
                _json_string(event.get("name", ""), f"{where}.name"),
                _json_time(_get(event, "timeUnixNano", "time_unix_nano"), f"{where}.timeUnixNano"),
                _json_attributes_limited(
                    event.get("attributes"), f"{where}.attributes", limits.max_event_attributes, out
                ),
            )
        )
    links: list[SpanLink] = []
    for position, link in enumerate(_json_limited_list(span.get("links"), "links", limits.max_links, out)):
        where = f"links[{position}]"
        if type(link) is not dict:
            raise _InvalidSpanError(f"{where} is not an object")
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


def decode_json(body: bytes, limits: DecodeLimits | None = None) -> DecodedSpans:
    """An ``ExportTraceServiceRequest`` in OTLP/JSON encoding as accepted records and rejections.

    Raises ``OtlpDecodeError`` when ``body`` is not JSON or its outer structure is not a request.
    """
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpDecodeError(f"the body ({len(body)} bytes) is not valid JSON: {exc}") from None
    if type(request) is not dict:
        raise OtlpDecodeError(
            f"the body is a JSON {type(request).__name__}, expected an ExportTraceServiceRequest object"
        )
    limits = limits or DEFAULT_LIMITS
    out = DecodedSpans()
    index = 0
    for rs_position, resource_spans in enumerate(_json_list(request, "resourceSpans", "resource_spans", "request")):
        where = f"resourceSpans[{rs_position}]"
        resource: dict[str, Any] | None = None
        resource_error = ""
        try:
            resource_obj = resource_spans.get("resource")
            if resource_obj is not None and type(resource_obj) is not dict:
                raise _InvalidSpanError(f"{where}.resource is not an object")
            resource = _json_attributes((resource_obj or {}).get("attributes"), f"{where}.resource.attributes")
        except (_InvalidSpanError, RecursionError) as exc:
            resource_error = str(exc) or "resource attributes nest too deeply"
        for ss_position, scope_spans in enumerate(_json_list(resource_spans, "scopeSpans", "scope_spans", where)):
            scope_where = f"{where}.scopeSpans[{ss_position}]"
            spans = _json_list(scope_spans, "spans", "spans", scope_where)
            scope = scope_spans.get("scope")
            scope_name = scope.get("name") if type(scope) is dict else None
            problem = resource_error
            if not problem and scope_name is not None and type(scope_name) is not str:
                problem = f"{scope_where}.scope.name {scope_name!r} is not a string"
            if problem or resource is None:
                # Every span under a bad resource or scope goes, each counted.
                out.reject(f"{len(spans)} span(s) under {scope_where}: {problem}", spans=len(spans))
                index += len(spans)
                continue
            for span in spans:
                try:
                    out.records.append(_json_span(span, resource, scope_name or None, limits, out))
                except _InvalidSpanError as exc:
                    out.reject(f"{_span_label(index, span.get('name'), _get(span, 'spanId', 'span_id'))}: {exc}")
                except RecursionError:
                    label = _span_label(index, span.get("name"), _get(span, "spanId", "span_id"))
                    out.reject(f"{label}: attribute values nest too deeply")
                index += 1
    return out


PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
JSON_CONTENT_TYPE = "application/json"


def decode_request(body: bytes, content_type: str, limits: DecodeLimits | None = None) -> DecodedSpans:
    """Decode by HTTP ``Content-Type`` (parameters such as ``; charset=utf-8`` are ignored)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == PROTOBUF_CONTENT_TYPE:
        return decode_protobuf(body, limits)
    if media_type == JSON_CONTENT_TYPE:
        return decode_json(body, limits)
    raise OtlpDecodeError(
        f"Content-Type {content_type!r} is not an OTLP encoding; use {PROTOBUF_CONTENT_TYPE} or {JSON_CONTENT_TYPE}"
    )


DEFAULT_LIMITS = DecodeLimits.from_env()
