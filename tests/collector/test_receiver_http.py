"""The collector sidecar over OTLP/HTTP: the OTel SDK's own exporter, raw requests, and the answers a client sees."""

import gzip
import http.client
import json
import logging
import socket
import threading
import tracemalloc
from pathlib import Path

import pytest
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult
from support.capture import capture_settings
from support.otlp_sidecar import (
    PROTOBUF,
    get,
    holding_queue,
    otlp_body,
    post,
    running_sidecar,
    sdk_spans,
    span_key,
    span_keys,
    spans_table,
    wait_for,
)

from tracelearn.collector.otlp_decode import DecodeLimits
from tracelearn.collector.span_exporter import ParquetSpanExporter
from tracelearn.schemas.dataset import dataset_files

TRACES = "/v1/traces"
JSON = {"Content-Type": "application/json"}


def sorted_rows(data: Path) -> list[dict[str, object]]:
    return sorted(spans_table(data).to_pylist(), key=lambda row: str(row["span_id"]))


def test_the_sdk_exporter_lands_the_same_rows_as_the_in_process_exporter(tmp_path: Path) -> None:
    spans = sdk_spans(20)
    in_process = ParquetSpanExporter(capture_settings(tmp_path / "in-process"))
    in_process.export(spans)
    in_process.shutdown()

    with running_sidecar(tmp_path / "sidecar") as sidecar:
        exporter = OTLPSpanExporter(endpoint=sidecar.url + TRACES, compression=Compression.Gzip)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
        assert not dataset_files(tmp_path / "sidecar" / "spans"), "acknowledged in the spool, rolled later"

    files = dataset_files(tmp_path / "sidecar" / "spans")
    assert [f.parent.relative_to(tmp_path / "sidecar") for f in files] == [
        f.parent.relative_to(tmp_path / "in-process") for f in dataset_files(tmp_path / "in-process" / "spans")
    ]
    assert files[0].parent.name == "service=otlp-agent" and files[0].parent.parent.name.startswith("date=")
    via_otlp, direct = sorted_rows(tmp_path / "sidecar"), sorted_rows(tmp_path / "in-process")
    assert len(via_otlp) == 20
    # Every column, promoted ones (messages, tokens, span type, rollout) and raw attribute maps included.
    assert via_otlp == direct
    llm = [row for row in via_otlp if row["span_type"] == "llm"]
    assert len(llm) == 19 and llm[0]["input_messages"] and llm[0]["request_model"] == "gpt-4o-mini"


def test_otlp_json_with_hex_ids_and_gzip_is_accepted(tmp_path: Path) -> None:
    trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    request = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "node-agent"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "js"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "name": "chat gpt-4o",
                                "kind": 3,
                                "startTimeUnixNano": "1790000000000000000",
                                "endTimeUnixNano": "1790000001000000000",
                                "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    body = gzip.compress(json.dumps(request).encode())
    with running_sidecar(tmp_path) as sidecar:
        status, headers, answer = post(
            sidecar.port, TRACES, body, {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
    assert (status, headers["content-type"], json.loads(answer)) == (200, "application/json", {})
    row = spans_table(tmp_path).to_pylist()[0]
    assert (row["trace_id"], row["span_id"], row["service_name"], row["span_type"]) == (
        trace_id, span_id, "node-agent", "llm",
    )


def test_a_request_with_some_invalid_spans_gets_partial_success_and_keeps_the_rest(tmp_path: Path) -> None:
    spans = sdk_spans(4)
    request = encode_spans(spans)
    request.resource_spans[0].scope_spans[0].spans[1].span_id = b"\x00" * 8
    request.resource_spans[0].scope_spans[0].spans[2].name = ""
    with running_sidecar(tmp_path) as sidecar:
        status, headers, answer = post(sidecar.port, TRACES, request.SerializeToString())
        no_trace_id = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x", "spanId": "AAE="}]}]}]}'
        json_status, _, json_answer = post(sidecar.port, TRACES, no_trace_id, {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"] == PROTOBUF
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert partial.rejected_spans == 2
    assert "span_id is all zeros" in partial.error_message and "name is missing" in partial.error_message
    assert len(span_keys(tmp_path)) == 2
    assert json_status == 200
    assert json.loads(json_answer)["partialSuccess"]["rejectedSpans"] == "1"
    assert "traceId is missing" in json.loads(json_answer)["partialSuccess"]["errorMessage"]


def bomb(inflated_gib: int) -> bytes:
    """A valid gzip body (concatenated members, as gzip(1) writes them) that inflates to ``inflated_gib`` GiB."""
    return gzip.compress(bytes(16 << 20), 9) * (64 * inflated_gib)


def test_bad_requests_are_answered_while_valid_traffic_on_another_connection_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tracelearn.collector")
    limit = 2 << 20
    valid = otlp_body(sdk_spans(5))
    good = otlp_body(sdk_spans(3))
    with running_sidecar(tmp_path, max_body_bytes=limit) as sidecar:
        answers: list[int] = []
        bad_ones_done = threading.Event()

        def valid_traffic() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=60)
            while not bad_ones_done.is_set() or not answers:
                answers.append(post(sidecar.port, TRACES, valid, connection=connection)[0])

        sender = threading.Thread(target=valid_traffic)
        sender.start()
        bad = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=60)

        status, headers, answer = post(sidecar.port, TRACES, b"\xff\xff\xff\xff not protobuf", connection=bad)
        assert (status, headers["content-type"]) == (400, PROTOBUF)
        error = status_pb2.Status.FromString(answer)
        assert error.code == 3 and "not a protobuf ExportTraceServiceRequest" in error.message

        assert post(sidecar.port, TRACES, good[: len(good) // 2], connection=bad)[0] == 400  # truncated protobuf
        status, _, answer = post(sidecar.port, TRACES, gzip.compress(good)[:-30], {"Content-Encoding": "gzip"},
                                 connection=bad)
        assert status == 400 and b"truncated" in answer
        status, headers, answer = post(sidecar.port, TRACES, good, {"Content-Type": "text/plain"}, connection=bad)
        assert status == 415 and b"application/x-protobuf" in answer
        assert post(sidecar.port, TRACES, good, {"Content-Encoding": "br"}, connection=bad)[0] == 415
        status, _, answer = post(sidecar.port, TRACES, bytes(limit + 1), connection=bad)
        assert status == 413 and b"limit" in answer
        assert post(sidecar.port, "/v1/logs", good, connection=bad)[0] == 404
        status, headers, answer = post(sidecar.port, TRACES, b'{"resourceSpans": [', JSON, connection=bad)
        assert (status, headers["content-type"]) == (400, "application/json") and b"not valid JSON" in answer
        base64_ids = {"resourceSpans": [{"scopeSpans": [{"spans": [{
            "traceId": "W47/95gDgQPSabYzgT/GDA==", "spanId": "7uGbfsPBsXQ=", "name": "chat",
            "startTimeUnixNano": "1790000000000000000", "endTimeUnixNano": "1790000001000000000"}]}]}]}
        status, _, answer = post(sidecar.port, TRACES, json.dumps(base64_ids).encode(), JSON, connection=bad)
        partial = json.loads(answer)["partialSuccess"]
        assert status == 200 and partial["rejectedSpans"] == "1" and "OTLP/JSON ids are hex" in partial["errorMessage"]
        # The same keep-alive connection still serves a valid request after all of that.
        assert post(sidecar.port, TRACES, good, connection=bad)[0] == 200

        # A 1 GiB gzip bomb (~1 MB on the wire) is refused having inflated little more than the limit.
        body = bomb(1)
        assert len(body) < limit
        tracemalloc.start()
        try:
            status, _, answer = post(sidecar.port, TRACES, body, {"Content-Encoding": "gzip"})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == 413 and b"inflates to more than" in answer
        assert peak < 8 * limit, f"the server held {peak} bytes for a body it refused"

        bad_ones_done.set()
        sender.join()
        assert answers == [200] * len(answers)
        metrics = get(sidecar.url, "/metrics")[1].decode()
    assert len(span_keys(tmp_path)) == 5 + 3, "the same valid request each time: its spans once"
    logged = [record.getMessage() for record in caplog.records]
    for text in ("answered 400 to POST /v1/traces", "answered 413 to POST /v1/traces", "answered 415",
                 "answered 404 to POST /v1/logs", "kept 0 of 1 spans of a request: rejected 1 span(s)"):
        assert any(text in line for line in logged), text
    for line in (
        'requests_total{front="http",path="/v1/traces",code="400"} 4',
        'requests_total{front="http",path="/v1/traces",code="415"} 2',
        'requests_total{front="http",path="/v1/traces",code="413"} 2',
        'requests_total{front="http",path="other",code="404"} 1',
        f'requests_total{{front="http",path="/v1/traces",code="200"}} {len(answers) + 2}',
        f"spans_accepted_total {5 * len(answers) + 3}",
    ):
        assert f"tracelearn_collector_{line}\n" in metrics, line


def test_a_retried_request_is_acknowledged_without_writing_its_spans_twice(tmp_path: Path) -> None:
    spans = sdk_spans(6)
    body = otlp_body(spans)
    with running_sidecar(tmp_path) as sidecar:
        assert post(sidecar.port, TRACES, body)[0] == 200
        assert post(sidecar.port, TRACES, body)[0] == 200  # the client never saw the first answer
        fresh = sdk_spans(2)
        assert post(sidecar.port, TRACES, otlp_body([*spans[:2], *fresh]))[0] == 200  # half old, half new
        status = json.loads(get(sidecar.url, "/status")[1])
    assert sorted(span_keys(tmp_path)) == sorted(map(span_key, [*spans, *fresh])), "each span once"
    assert (status["spans_accepted"], status["spans_duplicate"], status["spans_spooled"]) == (16, 8, 8)


def test_health_ready_metrics_and_status_say_what_happened(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, start=False) as sidecar:
        assert get(sidecar.url, "/health") == (200, b'{"status": "ok"}')
        status, answer = get(sidecar.url, "/ready")
        assert status == 503 and b"replaying" in answer, "not ready before the start-up replay"
        refused, headers, _ = post(sidecar.port, TRACES, otlp_body(sdk_spans(2)))
        assert refused == 503 and int(headers["retry-after"]) >= 1
        sidecar.receiver.start()
        assert sidecar.receiver.wait_ready(30)
        assert get(sidecar.url, "/ready")[0] == 200
        assert post(sidecar.port, TRACES, otlp_body(sdk_spans(5)))[0] == 200
        metrics = get(sidecar.url, "/metrics")[1].decode()
        status_json = json.loads(get(sidecar.url, "/status")[1])
    assert "tracelearn_collector_spans_accepted_total 5\n" in metrics
    assert "tracelearn_collector_spans_spooled_total 5\n" in metrics
    assert "tracelearn_collector_commits_total 1\n" in metrics
    assert 'tracelearn_collector_commit_seconds_bucket{le="+Inf"} 1\n' in metrics
    assert 'requests_total{front="http",path="/v1/traces",code="503"} 1' in metrics
    assert "# TYPE tracelearn_collector_queue_bytes gauge" in metrics
    assert status_json["ready"] and status_json["spans_awaiting_conversion"] == 5 and status_json["spool_bytes"] > 0
    assert status_json["disk_free_bytes"] > 0 and status_json["spans_files"] == 0


def test_feedback_is_written_durably_and_bad_items_are_named(tmp_path: Path) -> None:
    good = [
        {"trace_id": "0123456789abcdef0123456789abcdef", "name": "thumbs_up", "value": 1, "source": "user"},
        {"rollout_id": "r-7", "name": "grade", "value": 0.25, "time": "2026-11-20T10:00:00+00:00"},
    ]
    bad = [good[0], {"rollout_id": "r-8", "name": "grade", "value": "high"}, {"name": "x", "value": 1}]
    with running_sidecar(tmp_path) as sidecar:
        # curl -d sends application/x-www-form-urlencoded: the body is read as JSON whatever the type.
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, answer = post(sidecar.port, "/v1/feedback", json.dumps(good).encode(), headers)
        assert (status, json.loads(answer)) == (200, {"accepted": 2})
        files = dataset_files(tmp_path / "feedback")
        assert len(files) == 2, "durable before the answer: one file per date"
        status, _, answer = post(sidecar.port, "/v1/feedback", json.dumps(bad).encode())
        assert status == 400
        errors = json.loads(answer)["errors"]
        assert errors[0].startswith("item 1: value") and errors[1].startswith("item 2: needs rollout_id or trace_id")
        assert len(dataset_files(tmp_path / "feedback")) == 2, "a request with a bad item writes nothing"
        assert post(sidecar.port, "/v1/feedback", json.dumps(good[0]).encode())[0] == 200  # one object, no list
        for body, error in (
            (b'{"trace_id": "5B8EFFF7", "name": "n", "value": 1}', "item 0: trace_id: '5B8EFFF7' must be 32"),
            (b'{"rollout_id": "r", "name": "n", "value": 1e999}', "the body is not JSON: number is infinity"),
            (b'{"rollout_id": "r", "value": 1}', "item 0: name: is required"),
            (b'{"rollout_id": "r", "name": "n", "value": 1, "reward": 2}', "item 0: unknown keys reward"),
            (b"[]", "the body is an empty list"),
            (b"thumbs up", "the body is not JSON"),
        ):
            status, _, answer = post(sidecar.port, "/v1/feedback", body)
            assert status == 400 and json.loads(answer)["errors"][0].startswith(error), answer
    from tracelearn.schemas.dataset import read_table

    table = read_table(tmp_path / "feedback", "feedback")
    assert sorted(table.column("name").to_pylist()) == ["grade", "thumbs_up", "thumbs_up"]


def test_a_bearer_token_is_required_when_configured(tmp_path: Path) -> None:
    body = otlp_body(sdk_spans(3))
    with running_sidecar(tmp_path, token=b"s3cret-token") as sidecar:
        status, headers, _ = post(sidecar.port, TRACES, body)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert post(sidecar.port, TRACES, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(sidecar.port, "/v1/feedback", b"{}", {"Authorization": "Basic czNjcmV0LXRva2Vu"})[0] == 401
        assert get(sidecar.url, "/metrics")[0] == 401
        assert get(sidecar.url, "/health")[0] == 200 and get(sidecar.url, "/ready")[0] == 200
        exporter = OTLPSpanExporter(endpoint=sidecar.url + TRACES, headers={"Authorization": "Bearer s3cret-token"})
        assert exporter.export(sdk_spans(4)) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert len(span_keys(tmp_path)) == 4


def test_tls_with_a_self_signed_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from support.otlp_sidecar import self_signed_certificate

    # requests lets these override the exporter's certificate_file (set on this machine for the system CAs).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    tls = self_signed_certificate(tmp_path)
    with running_sidecar(tmp_path / "data", tls=tls) as sidecar:
        assert sidecar.url.startswith("https://")
        exporter = OTLPSpanExporter(endpoint=sidecar.url + TRACES, certificate_file=str(tls.cert))
        assert exporter.export(sdk_spans(3)) is SpanExportResult.SUCCESS
        exporter.shutdown()
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            post(sidecar.port, TRACES, otlp_body(sdk_spans(2)))  # plain HTTP to the TLS port
        import ssl

        trusting = ssl.create_default_context(cafile=str(tls.cert))
        assert get(sidecar.url, "/health", context=trusting)[0] == 200
    assert len(span_keys(tmp_path / "data")) == 3


def test_a_full_queue_answers_429_with_retry_after_and_loses_no_acknowledged_span(tmp_path: Path) -> None:
    requests = [sdk_spans(10) for _ in range(24)]
    acknowledged: list[tuple[str, str]] = []
    refusals: list[dict[str, str]] = []
    lock = threading.Lock()
    queue = 1 << 20
    with running_sidecar(tmp_path, queue_bytes=queue) as sidecar:

        def client(batches: list) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=60)
            for spans in batches:
                status, headers, _ = post(sidecar.port, TRACES, otlp_body(spans), connection=connection)
                with lock:
                    if status == 200:
                        acknowledged.extend(map(span_key, spans))
                    else:
                        assert status == 429, status
                        refusals.append(headers)

        # An upload that stalled with most of the queue's bytes sent leaves too little room for a request.
        with holding_queue(sidecar.url, sidecar.port, queue - 20_000):
            threads = [threading.Thread(target=client, args=(requests[i::6],)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        wait_for(lambda: json.loads(get(sidecar.url, "/status")[1])["queue_bytes"] == 0, 10, "the queue to empty")
        client(requests[:2])
    assert len(refusals) == 24, "every request of the burst was pushed back"
    assert all(headers["retry-after"] == "1" for headers in refusals)
    assert sorted(span_keys(tmp_path)) == sorted(acknowledged) and len(acknowledged) == 20


def test_the_sdk_exporter_retries_a_starting_collector_after_retry_after_and_its_spans_land(tmp_path: Path) -> None:
    with running_sidecar(tmp_path, start=False) as sidecar:
        starter = threading.Timer(0.5, sidecar.receiver.start)
        starter.start()
        spans = sdk_spans(5)
        exporter = OTLPSpanExporter(endpoint=sidecar.url + TRACES, timeout=20)
        assert exporter.export(spans) is SpanExportResult.SUCCESS, "retried after Retry-After"
        exporter.shutdown()
        starter.join()
    assert sorted(span_keys(tmp_path)) == sorted(map(span_key, spans))


def test_chunked_and_deflate_bodies_are_read_as_node_and_python_exporters_send_them(tmp_path: Path) -> None:
    chunked_spans, deflate_spans = sdk_spans(4), sdk_spans(3)
    body = gzip.compress(otlp_body(chunked_spans))
    with running_sidecar(tmp_path, max_body_bytes=64 * 1024) as sidecar:
        connection = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
        # Node's exporter pipes gzip into the request: no Content-Length, Transfer-Encoding: chunked.
        pieces = (body[i : i + 1000] for i in range(0, len(body), 1000))
        connection.request("POST", TRACES, body=pieces, encode_chunked=True,
                           headers={"Content-Type": PROTOBUF, "Content-Encoding": "gzip"})
        first = connection.getresponse()
        assert (first.status, first.read()) == (200, b"")
        # 4 MiB against a 64 KiB limit: the answer comes early, and the server reads and drops the rest
        # (a lingering close) so the client, still sending, gets the 413 rather than a reset.
        huge = (bytes(1 << 16) for _ in range(64))
        connection.request("POST", TRACES, body=huge, encode_chunked=True, headers={"Content-Type": PROTOBUF})
        answer = connection.getresponse()
        assert answer.status == 413 and answer.getheader("Connection") == "close"
        assert b"exceeds the limit" in answer.read()
        exporter = OTLPSpanExporter(endpoint=sidecar.url + TRACES, compression=Compression.Deflate)
        assert exporter.export(deflate_spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert sorted(span_keys(tmp_path)) == sorted(map(span_key, [*chunked_spans, *deflate_spans]))


def test_attribute_count_and_length_limits_keep_the_span_and_say_what_was_cut(tmp_path: Path) -> None:
    request = encode_spans(sdk_spans(2))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    for index in range(100):
        attribute = span.attributes.add()
        attribute.key, attribute.value.string_value = f"extra.{index}", "v"
    long_value = span.attributes.add()
    long_value.key, long_value.value.string_value = "a", "x" * 5000
    span.attributes.insert(0, long_value)  # the first ones are kept: put the long one among them
    limits = DecodeLimits(max_attributes=40)
    with running_sidecar(tmp_path, limits=limits, max_attribute_bytes=4000) as sidecar:
        status, _, answer = post(sidecar.port, TRACES, request.SerializeToString())
        metrics = get(sidecar.url, "/metrics")[1].decode()
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert partial.rejected_spans == 0, "the span is kept, cut to the limits"
    dropped = len(span.attributes) - 40
    assert f"dropped {dropped} attribute(s)" in partial.error_message
    assert "truncated 1 attribute value(s) longer than 4000 bytes" in partial.error_message
    assert f"tracelearn_collector_span_items_dropped_total {dropped}\n" in metrics
    assert "tracelearn_collector_attribute_values_truncated_total 1\n" in metrics
    rows = {row["span_id"]: row for row in spans_table(tmp_path).to_pylist()}
    row = rows[span.span_id.hex()]
    assert dict(row["attributes"])["a"] == "x" * 4000
    assert "extra.99" not in dict(row["attributes"])
    assert len(rows) == 2


def test_bodies_count_against_the_write_queue_as_their_bytes_arrive(tmp_path: Path) -> None:
    """A body holds queue bytes for what has arrived, not for what its Content-Length announces."""
    small = otlp_body(sdk_spans(3))
    body = otlp_body(sdk_spans(300))
    with running_sidecar(tmp_path, queue_bytes=1 << 20) as sidecar:
        slow = socket.create_connection(("127.0.0.1", sidecar.port), timeout=30)
        assert len(body) > 600_000
        slow.sendall(
            f"POST {TRACES} HTTP/1.1\r\nHost: x\r\nContent-Type: {PROTOBUF}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body[:1000]
        )
        wait_for(lambda: json.loads(get(sidecar.url, "/status")[1])["queue_bytes"] == 1000, 10, "the reservation")
        assert post(sidecar.port, TRACES, small)[0] == 200, "room for others while a body arrives"
        slow.sendall(body[1000:])
        response = http.client.HTTPResponse(slow)
        response.begin()
        assert response.status == 200
        slow.close()
        assert json.loads(get(sidecar.url, "/status")[1])["queue_bytes"] == 0
    assert len(span_keys(tmp_path)) == 303
