"""The collector sidecar for tests: in this process (receiver + real HTTP and gRPC fronts on free
loopback ports) or as a ``tracelearn collector serve`` process, plus realistic spans and raw requests.
"""

import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tracelearn.collector.receiver import ReceiverConfig
from tracelearn.collector.security import TlsFiles
from tracelearn.collector.sidecar import Sidecar, SidecarOptions
from tracelearn.schemas.dataset import read_table

TRACELEARN = Path(sys.executable).parent / "tracelearn"
PROTOBUF = "application/x-protobuf"


@contextmanager
def running_sidecar(
    data: Path,
    token: bytes | None = None,
    tls: TlsFiles | None = None,
    max_body_bytes: int = 16 * 1024 * 1024,
    start: bool = True,
    body_timeout_s: float = 30.0,
    **config: Any,
) -> Iterator[Sidecar]:
    """The library's sidecar (receiver, both fronts on free loopback ports); drained, stopped and converted on exit.

    ``start=False`` serves without the start-up replay (503 until ``sidecar.receiver.start()``).
    """
    options = SidecarOptions(
        replace(ReceiverConfig(data_root=data), **config),
        http=("127.0.0.1", 0),
        grpc=("127.0.0.1", 0),
        token=token,
        tls=tls,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        drain_seconds=5,
    )
    with Sidecar.bind(options) as sidecar:
        sidecar.serve(replay=start)
        if start:
            assert sidecar.wait_ready(30), sidecar.receiver.ready
        yield sidecar


def sdk_spans(count: int, service: str = "otlp-agent", prompt_bytes: int = 2000) -> list[ReadableSpan]:
    """``count`` ended SDK spans of one trace: a root and LLM calls with GenAI attributes and messages."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service, "deployment.environment": "test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai", "0.62.4")
    prompt = ("Add the two numbers and answer with the sum only. " * (prompt_bytes // 50 + 1))[:prompt_bytes]
    with tracer.start_as_current_span("rollout", attributes={"tracelearn.task.id": "t-1"}):
        for index in range(count - 1):
            with tracer.start_as_current_span("openai.chat", kind=SpanKind.CLIENT) as span:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.request.model": "gpt-4o-mini",
                        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                        "gen_ai.usage.input_tokens": 100 + index,
                        "gen_ai.usage.output_tokens": 7,
                        "gen_ai.response.finish_reasons": ("stop",),
                        "gen_ai.input.messages": json.dumps(
                            [{"role": "user", "parts": [{"type": "text", "content": f"{index}: {prompt}"}]}]
                        ),
                        "gen_ai.output.messages": json.dumps(
                            [{"role": "assistant", "parts": [{"type": "text", "content": str(index)}]}]
                        ),
                        "step": index,
                    }
                )
                span.add_event("first-token", {"ms": 12})
    provider.shutdown()
    return list(memory.get_finished_spans())


def otlp_body(spans: Sequence[ReadableSpan]) -> bytes:
    """The spans as an OTLP protobuf ``ExportTraceServiceRequest``, encoded by the SDK's own encoder."""
    return bytes(encode_spans(spans).SerializeToString())


def span_key(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def post(
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One POST on ``connection`` (or a new one); returns status, headers (lower-case names), body."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body, headers={"Content-Type": PROTOBUF, **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    answer = response.status, {k.lower(): v for k, v in response.getheaders()}, payload
    if connection is None:
        conn.close()
    return answer


@contextmanager
def holding_queue(url: str, port: int, nbytes: int) -> Iterator[socket.socket]:
    """An upload that has sent ``nbytes`` of a larger body and waits: its bytes hold the write queue.

    Closed on exit without sending the rest (the collector answers 400 and frees the bytes).
    """
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        connection.sendall(
            f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: {PROTOBUF}\r\n"
            f"Content-Length: {nbytes + 1}\r\n\r\n".encode() + bytes(nbytes)
        )
        wait_for(lambda: json.loads(get(url, "/status")[1])["queue_bytes"] >= nbytes, 10, "the upload's bytes")
        yield connection
    finally:
        connection.close()


def get(url: str, path: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> tuple[
    int, bytes
]:
    host_port = url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    conn: http.client.HTTPConnection
    if url.startswith("https"):
        conn = http.client.HTTPSConnection(host, int(port), timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    answer = response.status, response.read()
    conn.close()
    return answer


def spans_table(data: Path) -> pa.Table:
    root = data / "spans"
    return read_table(root, "spans") if root.exists() else read_table(data, "spans")


def span_keys(data: Path) -> list[tuple[str, str]]:
    """(trace_id, span_id) of every row in the dataset, duplicates kept."""
    table = spans_table(data)
    return list(zip(table.column("trace_id").to_pylist(), table.column("span_id").to_pylist(), strict=True))


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class SidecarProcess:
    """``tracelearn collector serve`` running as a child process."""

    process: subprocess.Popen[str]
    url: str
    grpc_address: str | None
    banner: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> str:
        """Send ``sig`` and return everything the process printed after its banner."""
        self.process.send_signal(sig)
        output, _ = self.process.communicate(timeout=timeout)
        return output


def start_sidecar_process(
    data: Path,
    *args: str,
    grpc: bool = False,
    http_port: int = 0,
    env: dict[str, str] | None = None,
    preexec_fn: Any = None,
) -> SidecarProcess:
    """Start ``tracelearn collector serve`` (on free ports unless ``http_port``); returns once ``/ready`` is 200."""
    command = [str(TRACELEARN), "collector", "serve", "--data", str(data), "--http", f"127.0.0.1:{http_port}",
               "--grpc", "127.0.0.1:0" if grpc else "", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
    )
    assert process.stdout is not None
    banner: list[str] = []
    url = grpc_address = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (url is None or (grpc and grpc_address is None)):
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the collector exited: {''.join(banner)}")
        banner.append(line)
        if match := re.search(r"OTLP/HTTP on (\S+)", line):
            url = match.group(1)
        if match := re.search(r"OTLP/gRPC on (\S+)", line):
            grpc_address = match.group(1)
    assert url is not None, "".join(banner)
    sidecar = SidecarProcess(process, url, grpc_address, "".join(banner))
    wait_for(lambda: _ready(sidecar.url), 60, "the collector to become ready")
    return sidecar


def _ready(url: str) -> bool:
    try:
        return get(url, "/ready")[0] == 200
    except OSError:
        return False


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A self-signed certificate for ``host`` (an IP SAN) and its key, as PEM files in ``directory``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return TlsFiles(cert_path, key_path)
