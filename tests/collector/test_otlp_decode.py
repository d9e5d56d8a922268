"""OTLP request bodies decoded into spans-table rows, equal to the in-process exporter's rows.

Spans come from the real OpenTelemetry SDK and are encoded by the SDK's own OTLP encoder, so these
tests check against what agents in the field send, not against our own idea of OTLP.
"""

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from support.capture import reset_global_tracer_provider

from tracelearn.collector.otlp_decode import (
    SPAN_KINDS,
    STATUS_CODES,
    DecodedSpans,
    DecodeLimits,
    OtlpDecodeError,
    decode_json,
    decode_protobuf,
    decode_request,
)
from tracelearn.collector.span_rows import SpanColumns, SpanRecord, from_readable_span
from tracelearn.instrumentation.emit import emit_message, emit_reward
from tracelearn.instrumentation.rollout_context import rollout
from tracelearn.instrumentation.span_processors import RolloutContextSpanProcessor
from tracelearn.schemas import semconv as sc

ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})

INPUT_MESSAGES = json.dumps(
    [
        {"role": "system", "parts": [{"type": "text", "content": "You are a calculator."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is 2 + 2? " * 40}]},
    ]
)
OUTPUT_MESSAGES = json.dumps(
    [
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "Let me add."},
                {"type": "tool_call", "id": "call_1", "name": "add", "arguments": {"a": 2, "b": 2}},
            ],
            "finish_reason": "tool_calls",
        }
    ]
)


@pytest.fixture
def sdk_spans() -> Iterator[list[ReadableSpan]]:
    """Spans of one rollout made by the real SDK with our processors: every attribute type, events, links."""
    reset_global_tracer_provider()
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": "calc-agent",
                "deployment.environment": "test",
                "host.cores": 16,
                "process.runtime.features": ("a", "b"),
            }
        )
    )
    provider.add_span_processor(RolloutContextSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("calc.agent", "1.2.3")
    try:
        with rollout(task_id="task-7", group="arith", attempt_id="a1", agent="calc", metadata={"level": 2}):
            with tracer.start_as_current_span("other-trace") as other:
                pass
            with tracer.start_as_current_span(
                "chat gpt-test",
                kind=SpanKind.CLIENT,
                links=[Link(other.get_span_context(), {"link.reason": "retry", "link.n": 2})],
            ) as llm:
                llm.set_attributes(
                    {
                        sc.GEN_AI_OPERATION_NAME: "chat",
                        sc.GEN_AI_REQUEST_MODEL: "gpt-test",
                        sc.GEN_AI_RESPONSE_MODEL: "gpt-test-2026",
                        sc.GEN_AI_RESPONSE_ID: "resp-1",
                        sc.GEN_AI_RESPONSE_FINISH_REASONS: ("tool_calls",),
                        sc.GEN_AI_USAGE_INPUT_TOKENS: 120,
                        sc.GEN_AI_USAGE_OUTPUT_TOKENS: 14,
                        sc.GEN_AI_INPUT_MESSAGES: INPUT_MESSAGES,
                        sc.GEN_AI_OUTPUT_MESSAGES: OUTPUT_MESSAGES,
                        sc.PROMPT_TOKEN_IDS: (1, 2, 3, 40000),
                        sc.RESPONSE_TOKEN_IDS: (7, 8),
                        sc.RESPONSE_LOGPROBS: (-0.25, -1.5),
                        "gen_ai.request.temperature": 0.7,
                        "gen_ai.request.stream": False,
                        "llm.flags": (True, False),
                        "llm.unicode": "naïve 🤖 \u00e9",
                    }
                )
                llm.add_event("gen_ai.choice", {"index": 0, "score": 0.5, "ok": True, "tags": ("x", "y")})
                llm.add_event("no attributes")
            with tracer.start_as_current_span("execute_tool add", kind=SpanKind.INTERNAL) as tool:
                tool.set_attributes({sc.GEN_AI_OPERATION_NAME: "execute_tool", sc.GEN_AI_TOOL_NAME: "add"})
                tool.set_status(Status(StatusCode.ERROR, "division by zero"))
            with tracer.start_as_current_span("server", kind=SpanKind.SERVER) as server:
                server.set_status(Status(StatusCode.OK))
            emit_reward({"correct": 1.0, "short": 0.25}, primary="correct")
            emit_message("assistant", "4")
        yield list(memory.get_finished_spans())
    finally:
        provider.shutdown()
        reset_global_tracer_provider()


def rows(records: list[SpanRecord], max_attribute_bytes: int = 8 * 1024 * 1024) -> pa.Table:
    """The spans-table rows ``SpanColumns`` builds from ``records``, sorted by span id."""
    columns = SpanColumns(max_attribute_bytes)
    columns.add_all(records)
    batches = list(columns.take().values())
    return pa.Table.from_batches(batches).sort_by("span_id")


def assert_same_rows(expected: pa.Table, actual: pa.Table) -> None:
    assert actual.num_rows == expected.num_rows
    assert actual.schema == expected.schema
    for name in expected.schema.names:
        left, right = expected.column(name), actual.column(name)
        if pa.types.is_timestamp(left.type):
            left, right = left.cast(pa.int64()), right.cast(pa.int64())
        assert right.to_pylist() == left.to_pylist(), f"column {name} differs"


def protobuf_body(spans: list[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def hex_ids(value: Any) -> Any:
    """Generic protobuf JSON base64-encodes bytes; OTLP/JSON wants trace and span ids as hex."""
    if isinstance(value, dict):
        return {key: base64.b64decode(item).hex() if key in ID_FIELDS else hex_ids(item) for key, item in value.items()}
    if isinstance(value, list):
        return [hex_ids(item) for item in value]
    return value


def otlp_json(spans: list[ReadableSpan], snake_case: bool = False) -> dict[str, Any]:
    message = MessageToDict(encode_spans(spans), preserving_proto_field_name=snake_case)
    result: dict[str, Any] = hex_ids(message)
    return result


def json_body(spans: list[ReadableSpan], snake_case: bool = False) -> bytes:
    return json.dumps(otlp_json(spans, snake_case)).encode()


def single_span(**fields: Any) -> dict[str, Any]:
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": "GET /",
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
    }
    span.update(fields)
    return {k: v for k, v in span.items() if v is not None}


def request_of(*spans: dict[str, Any], resource: dict[str, Any] | None = None) -> bytes:
    body = {
        "resourceSpans": [
            {
                "resource": resource or {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                "scopeSpans": [{"scope": {"name": "lib"}, "spans": list(spans)}],
            }
        ]
    }
    return json.dumps(body).encode()


# --- equivalence with the in-process path ------------------------------------------------------------


def test_protobuf_rows_equal_the_in_process_rows_column_by_column(sdk_spans: list[ReadableSpan]) -> None:
    expected = rows([from_readable_span(span) for span in sdk_spans])
    decoded = decode_protobuf(protobuf_body(sdk_spans))
    assert (decoded.rejected_spans, decoded.error_message) == (0, "")
    assert_same_rows(expected, rows(decoded.records))
    by_name = {row["name"]: row for row in expected.to_pylist()}
    # The fixture exercised what the comparison is meant to cover.
    llm = by_name["chat gpt-test"]
    assert llm["span_type"] == sc.TYPE_LLM and llm["task_id"] == "task-7" and llm["kind"] == "CLIENT"
    assert llm["prompt_token_ids"] == [1, 2, 3, 40000] and llm["links"] and llm["events"]
    assert by_name["execute_tool add"]["status_message"] == "division by zero"
    assert {row["reward_name"] for row in expected.to_pylist() if row["reward"] is not None} == {"correct", "short"}


@pytest.mark.parametrize("snake_case", [False, True], ids=["lowerCamelCase", "snake_case"])
def test_otlp_json_rows_equal_the_in_process_rows(sdk_spans: list[ReadableSpan], snake_case: bool) -> None:
    expected = rows([from_readable_span(span) for span in sdk_spans])
    decoded = decode_json(json_body(sdk_spans, snake_case))
    assert (decoded.rejected_spans, decoded.error_message) == (0, "")
    assert_same_rows(expected, rows(decoded.records))


def test_decode_request_picks_the_encoding_by_content_type(sdk_spans: list[ReadableSpan]) -> None:
    assert len(decode_request(protobuf_body(sdk_spans), "application/x-protobuf").records) == len(sdk_spans)
    assert len(decode_request(json_body(sdk_spans), "application/json; charset=utf-8").records) == len(sdk_spans)
    with pytest.raises(OtlpDecodeError, match="text/plain"):
        decode_request(b"", "text/plain")


def test_enum_names_match_the_sdk() -> None:
    assert set(SPAN_KINDS) == set(SpanKind.__members__)
    assert tuple(code.name for code in sorted(StatusCode, key=lambda c: c.value)) == STATUS_CODES


# --- OTLP/JSON specifics -----------------------------------------------------------------------------


def test_json_ids_are_hex_and_int64_may_be_strings_or_numbers() -> None:
    span = single_span(
        parentSpanId="0102030405060708",
        startTimeUnixNano=1700000000000000000,  # a number
        endTimeUnixNano="1700000000500000000",  # a string
        kind=3,
        attributes=[
            {"key": "n_str", "value": {"intValue": "9007199254740993"}},  # beyond a double's precision
            {"key": "n_num", "value": {"intValue": 5}},
            {"key": "x", "value": {"doubleValue": "NaN"}},
            {"key": "b", "value": {"bytesValue": base64.b64encode(b"\x00\xff").decode()}},
            {"key": "kv", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"boolValue": True}}]}}},
            {"key": "arr", "value": {"arrayValue": {"values": [{"intValue": "1"}, {"stringValue": "s"}, {}]}}},
            {"key": "empty", "value": {}},
        ],
    )
    decoded = decode_json(request_of(span))
    assert decoded.rejected_spans == 0, decoded.error_message
    record = decoded.records[0]
    assert format(record.trace_id, "032x") == "5b8efff798038103d269b633813fc60c"
    assert record.span_id == 0xEEE19B7EC3C1B174 and record.parent_span_id == 0x0102030405060708
    assert (record.start_ns, record.end_ns, record.kind) == (1700000000000000000, 1700000000500000000, "CLIENT")
    attributes = dict(record.attributes)
    assert attributes["n_str"] == 9007199254740993 and attributes["n_num"] == 5
    assert attributes["x"] != attributes["x"]  # NaN
    assert attributes["b"] == "AP8=" and attributes["kv"] == {"k": True}
    assert attributes["arr"] == [1, "s", None] and attributes["empty"] is None


def test_bytes_values_read_the_same_from_protobuf_and_json() -> None:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes(range(1, 17)), bytes(range(1, 9)), "s"
    span.start_time_unix_nano, span.end_time_unix_nano = 10, 20
    attribute = span.attributes.add()
    attribute.key, attribute.value.bytes_value = "blob", b"\x00\xffbinary"
    from_pb = decode_protobuf(request.SerializeToString()).records[0]
    from_json = decode_json(json.dumps(hex_ids(MessageToDict(request))).encode()).records[0]
    assert from_pb.attributes == from_json.attributes == {"blob": base64.b64encode(b"\x00\xffbinary").decode()}


def test_unknown_fields_are_ignored() -> None:
    span = single_span(futureField={"x": 1}, attributes=[{"key": "a", "value": {"stringValue": "v", "newKind": 1}}])
    body = json.loads(request_of(span))
    body["futureTopLevel"] = [1, 2]
    body["resourceSpans"][0]["scopeSpans"][0]["scope"]["futureScopeField"] = True
    decoded = decode_json(json.dumps(body).encode())
    assert decoded.rejected_spans == 0 and decoded.records[0].attributes == {"a": "v"}

    # protobuf: a field number this schema does not know (field 99, varint) inside the span is skipped.
    request = ExportTraceServiceRequest()
    pb_span = request.resource_spans.add().scope_spans.add().spans.add()
    pb_span.trace_id, pb_span.span_id, pb_span.name = b"\x01" * 16, b"\x02" * 8, "s"
    pb_span.start_time_unix_nano, pb_span.end_time_unix_nano = 10, 20
    span_bytes = pb_span.SerializeToString() + bytes([0x98, 0x06, 0x01])  # tag (99 << 3 | 0) as a varint, value 1
    reparsed = type(pb_span).FromString(span_bytes)
    request.resource_spans[0].scope_spans[0].spans[0].CopyFrom(reparsed)
    assert decode_protobuf(request.SerializeToString()).records[0].name == "s"


def test_enums_by_name_and_missing_optional_fields() -> None:
    span = single_span(kind="SPAN_KIND_PRODUCER", status={"code": "STATUS_CODE_ERROR", "message": "boom"})
    record = decode_json(request_of(span)).records[0]
    assert (record.kind, record.status_code, record.status_message) == ("PRODUCER", "ERROR", "boom")
    bare = decode_json(request_of(single_span())).records[0]
    assert (bare.kind, bare.status_code, bare.parent_span_id, bare.attributes) == ("INTERNAL", "UNSET", None, {})


def test_an_empty_request_is_valid() -> None:
    assert decode_json(b"{}") == DecodedSpans()
    assert decode_protobuf(b"") == DecodedSpans()


# --- per-span validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"traceId": "00000000000000000000000000000000"}, "traceId is all zeros"),
        ({"traceId": "abcd"}, "expected 32 hex digits"),
        ({"traceId": "W47/95gDgQPSabYzgT/GDA=="}, "base64? OTLP/JSON ids are hex"),
        ({"traceId": "zz8efff798038103d269b633813fc60c"}, "is not hex"),
        ({"traceId": None}, "traceId is missing"),
        ({"spanId": 12345}, "spanId 12345 is not a hex string"),
        ({"spanId": "0000000000000000"}, "spanId is all zeros"),
        ({"spanId": "eee19b7ec3c1b1"}, "expected 16 hex digits"),
        ({"parentSpanId": "12"}, "parentSpanId '12' is 2 characters"),
        ({"name": None}, "name is missing"),
        ({"name": 5}, "name 5 is not a string"),
        ({"startTimeUnixNano": None}, "start_time_unix_nano is missing"),
        ({"endTimeUnixNano": "1600000000000000000"}, "is before start_time_unix_nano"),
        ({"startTimeUnixNano": "soon"}, "startTimeUnixNano 'soon' is not an integer"),
        ({"kind": 9}, "kind 9 is not an OTLP SpanKind"),
        ({"status": {"code": 7}}, "status.code 7 is not an OTLP StatusCode"),
        ({"attributes": {"a": 1}}, "attributes is not a list"),
        ({"attributes": [{"key": "a", "value": {"intValue": "1.5"}}]}, "attributes['a'] intValue"),
        ({"attributes": [{"key": "a", "value": {"boolValue": "yes"}}]}, "is not true or false"),
        ({"events": [{"name": "e", "timeUnixNano": "x"}]}, "events[0].timeUnixNano 'x' is not an integer"),
        ({"links": [{"traceId": "00", "spanId": "0102030405060708"}]}, "links[0].traceId '00' is 2 characters"),
    ],
)
def test_a_bad_span_is_rejected_with_its_reason_and_the_rest_kept(fields: dict[str, Any], reason: str) -> None:
    good = single_span(spanId="0000000000000001")
    bad = single_span(**fields)  # a field given as None is left out
    decoded = decode_json(request_of(good, bad, single_span(spanId="0000000000000002")))
    assert [record.span_id for record in decoded.records] == [1, 2]
    assert decoded.rejected_spans == 1
    assert "span #1" in decoded.error_message and reason in decoded.error_message, decoded.error_message


def test_protobuf_spans_are_validated_the_same_way() -> None:
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for position, (trace_id, span_id, start, end, name) in enumerate(
        [
            (b"\x01" * 16, b"\x01" * 8, 10, 20, "good"),
            (b"\x01" * 15, b"\x02" * 8, 10, 20, "short trace id"),
            (b"\x00" * 16, b"\x03" * 8, 10, 20, "zero trace id"),
            (b"\x01" * 16, b"\x00" * 8, 10, 20, "zero span id"),
            (b"\x01" * 16, b"\x05" * 8, 30, 20, "backwards"),
            (b"\x01" * 16, b"\x06" * 8, 10, 20, ""),
            (b"\x01" * 16, b"\x07" * 8, 10, 20, "good too"),
        ]
    ):
        span = spans.add()
        span.trace_id, span.span_id, span.start_time_unix_nano, span.end_time_unix_nano = trace_id, span_id, start, end
        span.name = name
        if position == 6:
            span.parent_span_id = b"\x09" * 7
    spans[0].parent_span_id = b"\x00" * 8  # all-zero parent: a root span, as some exporters send it
    decoded = decode_protobuf(request.SerializeToString())
    assert [record.name for record in decoded.records] == ["good"]
    assert decoded.records[0].parent_span_id is None
    assert decoded.rejected_spans == 6
    message = decoded.error_message
    assert "rejected 6 span(s)" in message and "and 1 more" in message  # five reasons spelled out
    assert "span #1 'short trace id' (span_id 0202020202020202): trace_id is 15 bytes, expected 16" in message
    assert "trace_id is all zeros" in message and "span_id is all zeros" in message
    assert "end_time_unix_nano 20 is before start_time_unix_nano 30" in message and "name is missing" in message


def test_a_bad_resource_rejects_its_spans_and_keeps_other_resources() -> None:
    body = json.loads(request_of(single_span()))
    body["resourceSpans"].append(
        {"resource": {"attributes": "oops"}, "scopeSpans": [{"spans": [single_span(), single_span()]}]}
    )
    decoded = decode_json(json.dumps(body).encode())
    assert len(decoded.records) == 1 and decoded.rejected_spans == 2
    assert "2 span(s) under resourceSpans[1].scopeSpans[0]: resourceSpans[1].resource.attributes is not a list" in (
        decoded.error_message
    )


# --- malformed bodies --------------------------------------------------------------------------------


def test_malformed_protobuf_raises_the_decode_error(sdk_spans: list[ReadableSpan]) -> None:
    body = protobuf_body(sdk_spans)
    with pytest.raises(OtlpDecodeError, match="not a protobuf ExportTraceServiceRequest"):
        decode_protobuf(body[: len(body) // 2 + 3])  # truncated inside a field
    with pytest.raises(OtlpDecodeError, match="not a protobuf ExportTraceServiceRequest"):
        decode_protobuf(b"\xff\xff\xff\xff")
    with pytest.raises(OtlpDecodeError):
        decode_protobuf(json_body(sdk_spans))  # JSON sent as protobuf


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"resourceSpans": [', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "the body is a JSON list"),
        (b'{"resourceSpans": {}}', "request.resourceSpans is dict, expected a list"),
        (b'{"resourceSpans": [1]}', r"request.resourceSpans\[0\] is int, expected an object"),
        (b'{"resourceSpans": [{"scopeSpans": "x"}]}', r"resourceSpans\[0\].scopeSpans is str"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [null]}]}]}', r"spans\[0\] is NoneType"),
    ],
)
def test_malformed_json_raises_the_decode_error(body: bytes, message: str) -> None:
    with pytest.raises(OtlpDecodeError, match=message):
        decode_json(body)


# --- limits ------------------------------------------------------------------------------------------


def test_a_huge_attribute_is_truncated_and_counted_as_in_process(caplog: pytest.LogCaptureFixture) -> None:
    huge = "x" * 5000
    span = single_span(attributes=[{"key": "big", "value": {"stringValue": huge}}])
    decoded = decode_json(request_of(span))
    columns = SpanColumns(max_attribute_bytes=1000)
    with caplog.at_level(logging.WARNING):
        columns.add_all(decoded.records)
    table = pa.Table.from_batches(list(columns.take().values()))
    assert dict(table.column("attributes").to_pylist()[0])["big"] == "x" * 1000
    assert columns.truncated_values == 1
    assert "TRACELEARN_MAX_ATTRIBUTE_BYTES" in caplog.text


def test_count_limits_drop_extra_items_and_say_so() -> None:
    span = single_span(
        attributes=[{"key": f"k{i}", "value": {"intValue": i}} for i in range(5)],
        events=[{"name": f"e{i}", "timeUnixNano": "1"} for i in range(3)],
    )
    decoded = decode_json(request_of(span), DecodeLimits(max_attributes=2, max_events=1))
    record = decoded.records[0]
    assert list(record.attributes) == ["k0", "k1"] and [event[0] for event in record.events] == ["e0"]
    assert decoded.rejected_spans == 0 and decoded.dropped_items == 5
    assert "dropped 5 attribute(s)/event(s)/link(s)" in decoded.error_message


def nested_array_request(depth: int) -> bytes:
    """A request whose one attribute is an array in an array ... ``depth`` deep (built as text: too deep for json)."""
    value = '{"arrayValue":{"values":[' * depth + '{"stringValue":"leaf"}' + "]}}" * depth
    deep_span = json.dumps(single_span(attributes="PLACEHOLDER")).replace(
        '"PLACEHOLDER"', f'[{{"key":"deep","value":{value}}}]'
    )
    return request_of(single_span(spanId="0000000000000009"), {"PLACEHOLDER": 0}).replace(
        b'{"PLACEHOLDER": 0}', deep_span.encode()
    )


def test_deep_values_become_rows_too_deep_ones_reject_their_span_deeper_bodies_are_refused() -> None:
    decoded = decode_json(nested_array_request(40))  # about as deep as protobuf's own nesting limit allows
    assert decoded.rejected_spans == 0 and len(decoded.records) == 2
    deep = [dict(m)["deep"] for m in rows(decoded.records).column("attributes").to_pylist() if m]
    assert deep == ["[" * 40 + '"leaf"' + "]" * 40]
    # Each AnyValue level is three JSON levels and orjson parses up to 1024, so about 340 levels can
    # arrive: Python's recursion limit may reject that one span (with its reason), never the process.
    decoded = decode_json(nested_array_request(330))
    assert decoded.records[0].span_id == 9
    assert decoded.rejected_spans == 0 or "nest too deeply" in decoded.error_message
    with pytest.raises(OtlpDecodeError, match="not valid JSON"):
        decode_json(nested_array_request(400))
