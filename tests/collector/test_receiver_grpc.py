"""The collector sidecar over OTLP/gRPC: the OTel SDK's gRPC exporter and raw calls, and the status codes they get."""

import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult
from support.capture import capture_settings
from support.otlp_sidecar import (
    holding_queue,
    otlp_body,
    running_sidecar,
    sdk_spans,
    self_signed_certificate,
    span_key,
    span_keys,
    spans_table,
)

from tracelearn.collector.otlp_grpc import METHOD_PATH
from tracelearn.collector.span_exporter import ParquetSpanExporter

KEY_COLUMNS = ["trace_id", "span_id", "parent_span_id", "name", "kind", "start_time", "end_time", "service_name",
               "span_type", "rollout_id", "task_id", "operation_name", "request_model", "input_messages",
               "output_messages", "input_tokens", "output_tokens", "attributes", "resource_attributes", "events"]


def export_call(address: str) -> grpc.UnaryUnaryMultiCallable:
    """The Export method on a plain channel, taking and returning bytes."""
    return grpc.insecure_channel(address).unary_unary(METHOD_PATH)


def test_the_sdk_grpc_exporter_lands_the_same_rows_as_the_in_process_exporter(tmp_path: Path) -> None:
    spans = sdk_spans(12)
    in_process = ParquetSpanExporter(capture_settings(tmp_path / "in-process"))
    in_process.export(spans)
    in_process.shutdown()
    with running_sidecar(tmp_path / "sidecar") as sidecar:
        exporter = OTLPSpanExporter(endpoint=sidecar.grpc_address, insecure=True, compression=grpc.Compression.Gzip)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()

    def rows(data: Path) -> list[dict[str, object]]:
        return sorted(spans_table(data).select(KEY_COLUMNS).to_pylist(), key=lambda row: str(row["span_id"]))

    assert rows(tmp_path / "sidecar") == rows(tmp_path / "in-process")
    assert len(rows(tmp_path / "sidecar")) == 12


def test_malformed_requests_get_invalid_argument_while_valid_calls_on_another_channel_succeed(tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    spans = sdk_spans(3)
    valid = [sdk_spans(4) for _ in range(200)]
    with running_sidecar(tmp_path, max_body_bytes=1 << 20) as sidecar:
        sent: list[list] = []
        failed: list[list] = []
        bad_ones_done = threading.Event()

        def valid_traffic() -> None:
            exporter = OTLPSpanExporter(endpoint=sidecar.grpc_address, insecure=True)
            for batch in valid:
                if bad_ones_done.is_set() and sent:
                    break
                (sent if exporter.export(batch) is SpanExportResult.SUCCESS else failed).append(batch)
            exporter.shutdown()

        sender = threading.Thread(target=valid_traffic)
        sender.start()
        export = export_call(sidecar.grpc_address)
        with pytest.raises(grpc.RpcError) as raised:
            export(b"\xff\xff\xff not protobuf", timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a protobuf ExportTraceServiceRequest" in raised.value.details()
        body = otlp_body(spans)
        with pytest.raises(grpc.RpcError) as raised:
            export(body[: len(body) // 2], timeout=10)  # truncated
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            export(bytes(2 << 20), timeout=10)  # above the message limit
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        request = encode_spans(spans)
        request.resource_spans[0].scope_spans[0].spans[0].trace_id = b"\x01\x02"
        response = ExportTraceServiceResponse.FromString(export(request.SerializeToString(), timeout=10))
        bad_ones_done.set()
        sender.join()
    assert response.partial_success.rejected_spans == 1
    assert "trace_id is 2 bytes, expected 16" in response.partial_success.error_message
    assert sent and not failed, "valid traffic went on"
    expected = {span_key(span) for span in spans[1:]} | {span_key(span) for batch in sent for span in batch}
    keys = span_keys(tmp_path)
    assert len(keys) == len(expected) and set(keys) == expected


def retry_delay(error: grpc.RpcError) -> tuple[float, float]:
    """The retry delay of both trailing-metadata forms: RetryInfo alone, and inside the google.rpc.Status."""
    trailing = dict(error.trailing_metadata())
    plain = error_details_pb2.RetryInfo.FromString(trailing["google.rpc.retryinfo-bin"])
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    assert status.code == error.code().value[0]
    inner = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(inner)
    return plain.retry_delay.ToTimedelta().total_seconds(), inner.retry_delay.ToTimedelta().total_seconds()


def test_a_starting_collector_answers_unavailable_with_retry_info_and_the_exporter_honours_it(tmp_path: Path) -> None:
    spans = sdk_spans(4)
    with running_sidecar(tmp_path, start=False) as sidecar:
        with pytest.raises(grpc.RpcError) as raised:
            export_call(sidecar.grpc_address)(otlp_body(spans), timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert retry_delay(raised.value) == (2.0, 2.0)

        starter = threading.Timer(0.5, sidecar.receiver.start)
        starter.start()
        started = time.monotonic()
        exporter = OTLPSpanExporter(endpoint=sidecar.grpc_address, insecure=True, timeout=20)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        # The SDK's own backoff would retry after ~1 s; it waited the 2 s it was told.
        assert time.monotonic() - started >= 1.9
        exporter.shutdown()
        starter.join()
    assert sorted(span_keys(tmp_path)) == sorted(map(span_key, spans))


def test_a_full_queue_answers_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    bodies = [(otlp_body(spans), spans) for spans in (sdk_spans(10) for _ in range(24))]
    acknowledged: list[tuple[str, str]] = []
    delays: list[tuple[float, float]] = []
    lock = threading.Lock()
    queue = 1 << 20
    with running_sidecar(tmp_path, queue_bytes=queue) as sidecar:

        def client(share: list) -> None:
            export = export_call(sidecar.grpc_address)
            for body, spans in share:
                try:
                    export(body, timeout=30)
                except grpc.RpcError as error:
                    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    with lock:
                        delays.append(retry_delay(error))
                    continue
                with lock:
                    acknowledged.extend(map(span_key, spans))

        # An HTTP upload that stalled with most of the queue's bytes sent leaves too little room for a call.
        with holding_queue(sidecar.url, sidecar.port, queue - 20_000):
            threads = [threading.Thread(target=client, args=(bodies[i::6],)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        client(bodies[:2])
    assert len(delays) == 24 and set(delays) == {(1.0, 1.0)}
    assert sorted(span_keys(tmp_path)) == sorted(acknowledged) and len(acknowledged) == 20


def test_a_compressed_message_above_the_limit_is_refused(tmp_path: Path) -> None:
    body = otlp_body(sdk_spans(60, prompt_bytes=20_000))  # ~1.2 MB, compresses to a few KB
    with running_sidecar(tmp_path, max_body_bytes=1 << 20) as sidecar:
        with pytest.raises(grpc.RpcError) as raised:
            export_call(sidecar.grpc_address)(body, timeout=10, compression=grpc.Compression.Gzip)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert export_call(sidecar.grpc_address)(otlp_body(sdk_spans(2)), timeout=10) == b""
    assert len(span_keys(tmp_path)) == 2


def test_grpc_needs_the_bearer_token_and_speaks_tls(tmp_path: Path) -> None:
    tls = self_signed_certificate(tmp_path)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.cert.read_bytes())
    spans = sdk_spans(3)
    with running_sidecar(tmp_path / "data", token=b"grpc-token", tls=tls) as sidecar:
        channel = grpc.secure_channel(sidecar.grpc_address, credentials)
        export = channel.unary_unary(METHOD_PATH)
        with pytest.raises(grpc.RpcError) as raised:
            export(otlp_body(spans), timeout=10)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as raised:
            export(otlp_body(spans), timeout=10, metadata=[("authorization", "Bearer nope")])
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        exporter = OTLPSpanExporter(
            endpoint=sidecar.grpc_address, credentials=credentials, headers={"authorization": "Bearer grpc-token"}
        )
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
        with pytest.raises(grpc.RpcError) as raised:  # plaintext against the TLS port
            export_call(sidecar.grpc_address)(otlp_body(spans), timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert sorted(span_keys(tmp_path / "data")) == sorted(map(span_key, spans))
