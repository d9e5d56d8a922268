"""``tracelearn collector serve`` as a process: kill -9 mid-stream loses nothing acknowledged and duplicates
nothing; SIGTERM drains, flushes and exits 0; ``tracelearn collector status`` reports on it."""

import http.client
import json
import signal
import socket
import threading
from pathlib import Path

from click.testing import CliRunner
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from support.otlp_sidecar import (
    otlp_body,
    post,
    sdk_spans,
    span_key,
    span_keys,
    start_sidecar_process,
)

from tracelearn.cli.main import main
from tracelearn.collector.spool import SPOOL_DIR

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

    def send_concurrently(self, port: int, indices: list[int], clients: int = 4) -> None:
        threads = [threading.Thread(target=self.send, args=(port, indices[i::clients])) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def test_kill_9_mid_stream_then_restart_leaves_every_acknowledged_span_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    batches = [sdk_spans(20) for _ in range(160)]
    client = RecordingClient([otlp_body(spans) for spans in batches])
    # Small rolls: when the kill comes some spans are in Parquet files, some only in the spool.
    env = {"TRACELEARN_ROLL_BYTES": str(400_000)}
    first = start_sidecar_process(data, env=env)

    killed = threading.Event()
    senders = [
        threading.Thread(target=client.send, args=(first.port, list(range(i, len(batches), 4)), killed))
        for i in range(4)
    ]
    for sender in senders:
        sender.start()
    while len(client.acknowledged) < 60:
        threading.Event().wait(0.01)
    first.process.send_signal(signal.SIGKILL)  # requests are in flight on all four connections
    first.process.wait(timeout=30)
    killed.set()
    for sender in senders:
        sender.join()
    acknowledged_before_kill = set(client.acknowledged)
    assert 60 <= len(acknowledged_before_kill) < len(batches)
    assert any((data / "spans" / SPOOL_DIR).glob("spool-*.arrows")), "the kill left a spool behind"

    second = start_sidecar_process(data, env=env)
    # The client retries whatever it did not see acknowledged, as OTLP exporters do; some of those
    # were committed by the killed process just before it died.
    client.send_concurrently(second.port, [i for i in range(len(batches)) if i not in client.acknowledged])
    output = second.stop(signal.SIGTERM)
    assert second.process.returncode == 0, output
    assert "replayed" in second.banner + output

    assert client.acknowledged == set(range(len(batches))), "every request acknowledged in the end"
    keys = span_keys(data)
    assert len(keys) == len(set(keys)), "no span twice"
    assert set(keys) == {span_key(span) for spans in batches for span in spans}
    assert not list((data / "spans" / SPOOL_DIR).glob("spool-*.arrows")), "a clean shutdown leaves no spool"


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
    assert json.loads(raw.output)["spans_accepted"] == 30 and json.loads(raw.output)["buffered_rows"] == 30

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
    assert not list((data / "spans" / SPOOL_DIR).glob("spool-*.arrows"))

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
    (tmp_path / "cert.pem").write_text("x")
    result = CliRunner().invoke(main, ["collector", "serve", "--tls-cert", str(tmp_path / "cert.pem")])
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
    result = CliRunner().invoke(main, ["collector", "serve", "--http", "", "--grpc", ""])
    assert result.exit_code == 2 and "both fronts are off" in result.output
    result = CliRunner().invoke(main, ["collector", "serve", "--http", "localhost"])
    assert result.exit_code == 2 and "is not HOST:PORT" in result.output
