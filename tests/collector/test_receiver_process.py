"""``tracelearn collector serve`` as a process: kill -9 mid-stream loses nothing acknowledged and duplicates
nothing; SIGTERM drains, flushes and exits 0; ``tracelearn collector status`` reports on it."""

import http.client
import json
import select
import signal
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from support.otlp_sidecar import (
    SidecarProcess,
    get,
    otlp_body,
    post,
    sdk_spans,
    span_key,
    span_keys,
    start_sidecar_process,
    wait_for,
)

from tracelearn.cli.main import main
from tracelearn.collector.spool import SPOOL_DIR
from tracelearn.schemas.dataset import dataset_files
from tracelearn.serving.http_server import free_port

TRACES = "/v1/traces"


class RecordingClient:
    """Sends numbered requests on keep-alive connections and records which ones were acknowledged (200)."""

    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        self.acknowledged: set[int] = set()
        self.lock = threading.Lock()

    def send(self, port: int, indices: list[int], stop: threading.Event | None = None) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for index in indices:
            if stop is not None and stop.is_set():
                return
            try:
                status = post(port, TRACES, self.requests[index], connection=connection)[0]
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue  # not acknowledged: the client will retry it
            if status == 200:
                with self.lock:
                    self.acknowledged.add(index)


@pytest.mark.slow
def test_kill_9_mid_stream_under_the_sdk_exporter_then_restart_leaves_every_acknowledged_span_once(
    tmp_path: Path,
) -> None:
    """Four agents' OTLP HTTP exporters stream through a kill -9 and a restart on the same address.

    The SDK exporter retries a request it saw no answer for (connection reset, refused, then 503 with
    Retry-After during the restart's replay), as it does in production; some of those requests were
    committed by the killed process just before it died, so the restarted one must recognize them.
    """
    data = tmp_path / "data"
    port = free_port()
    batches = [sdk_spans(20) for _ in range(600)]
    env = {"TRACELEARN_ROLL_BYTES": str(400_000)}
    first = start_sidecar_process(data, http_port=port, env=env)
    results: dict[int, SpanExportResult] = {}
    lock = threading.Lock()
    enough = threading.Event()  # set once the restarted collector has taken some of the stream

    def agent(indices: list[int]) -> None:
        # The exporter's timeout bounds its retries: long enough to span the restart.
        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}{TRACES}", timeout=60)
        for index in indices:
            if enough.is_set():
                break
            result = exporter.export(batches[index])
            with lock:
                results[index] = result
        exporter.shutdown()

    agents = [threading.Thread(target=agent, args=(list(range(i, len(batches), 4)),)) for i in range(4)]
    for thread in agents:
        thread.start()
    # Kill once a conversion has written Parquet files: some spans are in files, some only in the request log.
    wait_for(lambda: len(results) >= 40 and dataset_files(data / "spans"), 60, "a roll")
    # One more request is committed and answered, but its client never reads the answer: for it the
    # request is unacknowledged, and it sends it again to the restarted collector.
    unanswered = sdk_spans(20)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        body = otlp_body(unanswered)
        raw.sendall(
            f"POST {TRACES} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        assert select.select([raw], [], [], 30)[0], "the collector answered (after its commit)"
        first.process.send_signal(signal.SIGKILL)  # requests are in flight on all four connections
    first.process.wait(timeout=30)
    acknowledged_before_kill = len(results)
    assert any((data / "spans" / SPOOL_DIR).glob("requests-*.otlp")), "the kill left a request log behind"

    second = start_sidecar_process(data, http_port=port, env=env)
    retry = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}{TRACES}")
    assert retry.export(unanswered) is SpanExportResult.SUCCESS
    retry.shutdown()
    wait_for(lambda: len(results) >= acknowledged_before_kill + 40, 120, "exports to the restarted collector")
    enough.set()
    for thread in agents:
        thread.join()
    output = second.stop(signal.SIGTERM)
    assert second.process.returncode == 0, output
    assert "adopted" in second.banner + output, "the killed collector's request log, converted while serving"

    assert set(results.values()) == {SpanExportResult.SUCCESS}, "every export acknowledged in the end"
    keys = span_keys(data)
    assert len(keys) == len(set(keys)), "no span twice"
    exported = [batches[index] for index in results]
    assert set(keys) == {span_key(span) for spans in [*exported, unanswered] for span in spans}
    assert not list((data / "spans" / SPOOL_DIR).glob("requests-*.otlp")), "a clean shutdown leaves no log"


def test_sigterm_drains_flushes_and_exits_0_and_status_reports_on_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sidecar = start_sidecar_process(data, grpc=True)
    assert "OTLP/HTTP on http://127.0.0.1:" in sidecar.banner and "OTLP/gRPC on 127.0.0.1:" in sidecar.banner
    spans = sdk_spans(30)
    exporter = OTLPSpanExporter(endpoint=sidecar.url + TRACES)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert post(sidecar.port, "/v1/feedback", b'{"rollout_id": "r-1", "name": "thumbs_up", "value": 1}')[0] == 200

    shown = CliRunner().invoke(main, ["collector", "status", "--url", sidecar.url])
    assert shown.exit_code == 0, shown.output
    for text in ("spans accepted", "30", "spool", "1 segments", "free disk", "queue", "0 B of 64.0 MiB"):
        assert text in shown.output, text
    raw = CliRunner().invoke(main, ["collector", "status", "--url", sidecar.url, "--json"])
    numbers = json.loads(raw.output)
    assert numbers["spans_accepted"] == 30 and numbers["spans_awaiting_conversion"] == 30

    # Requests keep arriving while it shuts down: each is either acknowledged (and lands) or refused.
    client = RecordingClient([otlp_body(sdk_spans(5)) for _ in range(400)])
    stop = threading.Event()
    sender = threading.Thread(target=client.send, args=(sidecar.port, list(range(400)), stop))
    sender.start()
    while not client.acknowledged:
        threading.Event().wait(0.01)
    output = sidecar.stop(signal.SIGTERM)
    stop.set()
    sender.join()
    assert sidecar.process.returncode == 0, output
    assert "shutdown flushed" in output and "Traceback" not in output
    expected = {span_key(span) for span in spans} | {
        key for index in client.acknowledged for key in span_keys_of(client.requests[index])
    }
    assert set(span_keys(data)) == expected and len(span_keys(data)) == len(expected)
    assert not list((data / "spans" / SPOOL_DIR).glob("requests-*.otlp"))

    gone = CliRunner().invoke(main, ["collector", "status", "--url", sidecar.url])
    assert gone.exit_code == 1 and "cannot reach the collector" in gone.output


def span_keys_of(body: bytes) -> set[tuple[str, str]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(body)
    return {
        (span.trace_id.hex(), span.span_id.hex())
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    }


def test_serve_refuses_a_port_in_use_and_half_a_tls_pair(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["collector", "serve", "--data", str(tmp_path), "--http", f"127.0.0.1:{port}", "--grpc", ""]
        )
        assert result.exit_code == 1 and "cannot start the collector" in result.output
        result = CliRunner().invoke(
            main, ["collector", "serve", "--data", str(tmp_path), "--http", "", "--grpc", f"127.0.0.1:{port}"]
        )
        assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output
        # The HTTP front bound first is closed again when the gRPC one cannot bind.
        both = ["--http", "127.0.0.1:0", "--grpc", f"127.0.0.1:{port}"]
        result = CliRunner().invoke(main, ["collector", "serve", "--data", str(tmp_path), *both])
        assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output
    (tmp_path / "cert.pem").write_text("x")
    result = CliRunner().invoke(main, ["collector", "serve", "--tls-cert", str(tmp_path / "cert.pem")])
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
    result = CliRunner().invoke(main, ["collector", "serve", "--http", "", "--grpc", ""])
    assert result.exit_code == 2 and "both fronts are off" in result.output
    result = CliRunner().invoke(main, ["collector", "serve", "--http", "localhost"])
    assert result.exit_code == 2 and "is not HOST:PORT" in result.output


def test_serve_listens_on_loopback_unless_told_otherwise() -> None:
    from tracelearn.cli.collector import serve

    defaults = {param.name: param.default for param in serve.params}
    assert (defaults["http_address"], defaults["grpc_address"]) == ("127.0.0.1:4318", "127.0.0.1:4317")
    assert defaults["token_file"] is None and defaults["tls_cert"] is None


def test_without_grpcio_the_default_grpc_front_is_left_off_and_an_explicit_one_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tracelearn.collector.receiver import ReceiverConfig
    from tracelearn.collector.sidecar import Sidecar, SidecarOptions, SidecarStartError

    monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError, as without grpcio
    monkeypatch.delitem(sys.modules, "tracelearn.collector.otlp_grpc", raising=False)
    loopback = ("127.0.0.1", 0)
    options = SidecarOptions(ReceiverConfig(data_root=tmp_path), http=loopback, grpc=loopback, grpc_required=False)
    with Sidecar.bind(options) as sidecar:
        assert sidecar.http is not None and sidecar.grpc is None
    assert "OTLP/gRPC is off: grpcio is not installed" in caplog.text
    with pytest.raises(SidecarStartError, match="OTLP/gRPC needs grpcio"):
        Sidecar.bind(replace(options, grpc_required=True))


def test_a_retry_after_a_restart_lands_once_after_sigterm_and_after_kill_9(tmp_path: Path) -> None:
    """The same spans sent before and after a restart once gave two rows each (the window forgot them)."""
    data = tmp_path / "data"
    slow, fast = {"TRACELEARN_ROLL_SECONDS": "60"}, {"TRACELEARN_ROLL_SECONDS": "1"}
    first, second, third = (otlp_body(sdk_spans(10)) for _ in range(3))

    def status(sidecar: SidecarProcess) -> dict[str, int]:
        return json.loads(get(sidecar.url, "/status")[1])

    collector = start_sidecar_process(data, env=fast)
    assert post(collector.port, TRACES, first)[0] == 200
    collector.stop(signal.SIGTERM)
    assert collector.process.returncode == 0, "converted, then gone"

    collector = start_sidecar_process(data, env=slow)
    assert post(collector.port, TRACES, first)[0] == 200, "a retry of what the previous process wrote"
    assert status(collector)["spans_duplicate"] == 10
    assert post(collector.port, TRACES, second)[0] == 200
    collector.stop(signal.SIGKILL)  # acknowledged, still in the request log

    collector = start_sidecar_process(data, env=fast)
    assert post(collector.port, TRACES, second)[0] == 200, "a retry of what the killed process acknowledged"
    assert post(collector.port, TRACES, third)[0] == 200
    wait_for(lambda: status(collector)["spans_written"] >= 10, 30, "the conversion of the third request")
    assert status(collector)["spans_duplicate"] == 10
    collector.stop(signal.SIGKILL)  # acknowledged and converted: only the key index remembers it

    collector = start_sidecar_process(data, env=fast)
    assert post(collector.port, TRACES, third)[0] == 200
    assert status(collector)["spans_duplicate"] == 10
    collector.stop(signal.SIGTERM)
    assert collector.process.returncode == 0
    keys = span_keys(data)
    assert len(keys) == len(set(keys)) == 30, "each span once, across a SIGTERM and two kill -9"
    assert set(keys) == span_keys_of(first) | span_keys_of(second) | span_keys_of(third)
