"""Memory bounded in fact (issue 18): the adversarial bodies that once took the collector to gigabytes, and
idle uploads that once held the whole write queue, against ``tracelearn collector serve`` as a process."""

import json
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from support.otlp_sidecar import PROTOBUF, get, otlp_body, post, sdk_spans, span_keys, start_sidecar_process, wait_for

TRACES = "/v1/traces"
MIB = 1 << 20
QUEUE = 64 * MIB  # the default --queue-bytes
ROLL = 16 * MIB
START_NS = 1_790_000_000 * 10**9
DEDUP_WINDOW = 500_000  # the default --dedup-window


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def resource_heavy(copy: int) -> bytes:
    """30,000 resource attributes over 3,000 tiny spans (~600 KB): once 2.98 GB and 1.3 GB of spool."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for index in range(30_000):
        attribute = resource_spans.resource.attributes.add()
        attribute.key, attribute.value.string_value = f"k{index}", "v"
    spans = resource_spans.scope_spans.add().spans
    for index in range(3_000):
        span = spans.add()
        span.trace_id = copy.to_bytes(8, "big") + (index + 1).to_bytes(8, "big")
        span.span_id = (index + 1).to_bytes(8, "big")
        span.name, span.start_time_unix_nano, span.end_time_unix_nano = "s", START_NS, START_NS + 10**9
    return bytes(request.SerializeToString())


def tiny_spans(copy: int, count: int = 300_000) -> bytes:
    """14.5 MB of tiny spans: once +670 MB each, four at once 2.6 GB."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for index in range(count):
        span = spans.add()
        span.trace_id = (copy + 100).to_bytes(8, "big") + (index + 1).to_bytes(8, "big")
        span.span_id = (index + 1).to_bytes(8, "big")
        span.name, span.start_time_unix_nano, span.end_time_unix_nano = "s", START_NS, START_NS + 10**9
    return bytes(request.SerializeToString())


def empty_spans(count: int = 7 << 20) -> bytes:
    """~14 MB of empty spans, 2 bytes each: 1.4 GB for a parser that takes the whole body at once."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    spans = b"\x12\x00" * count
    scope = b"\x12" + varint(len(spans)) + spans
    resource = b"\x12" + varint(len(scope)) + scope
    return b"\x0a" + varint(len(resource)) + resource


def big_feedback(copy: int, item_bytes: int = 1500) -> bytes:
    """10,000 valid items of ~1.5 KB, 15.6 MB: once uncounted by the queue, 8 at once 2.2 GB."""
    source = "x" * item_bytes
    items = [{"rollout_id": f"r-{copy}-{i}", "name": "grade", "value": 1, "source": source} for i in range(10_000)]
    return json.dumps(items).encode()


def send_until_answered(port: int, path: str, body: bytes, headers: dict[str, str], answers: list[int]) -> None:
    """POST ``body``, waiting out 429/503 as an OTLP client does, for up to five minutes; records the last status."""
    deadline = time.monotonic() + 300
    while True:
        status, answer_headers, _ = post(port, path, body, headers)
        if status not in (429, 503) or time.monotonic() > deadline:
            answers.append(status)
            return
        time.sleep(float(answer_headers.get("retry-after", "1")))


@pytest.mark.slow
def test_adversarial_bodies_keep_the_collector_within_its_memory_bound(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"TRACELEARN_ROLL_BYTES": str(ROLL), "TRACELEARN_ROLL_SECONDS": "1"}
    sidecar = start_sidecar_process(data, "--queue-bytes", str(QUEUE), env=env)
    pid = sidecar.process.pid
    try:
        assert post(sidecar.port, TRACES, otlp_body(sdk_spans(50)))[0] == 200  # warm: every code path loaded
        wait_for(lambda: json.loads(get(sidecar.url, "/status")[1])["spans_written"] == 50, 60, "the warm-up")
        base_kib = memory_kib(pid, "VmRSS")
        attacks: list[tuple[str, bytes, dict[str, str], set[int]]] = [
            *((TRACES, resource_heavy(copy), {"Content-Type": PROTOBUF}, {200}) for copy in range(4)),
            *((TRACES, tiny_spans(copy), {"Content-Type": PROTOBUF}, {200}) for copy in range(2)),
            *((TRACES, empty_spans(), {"Content-Type": PROTOBUF}, {413}) for _ in range(2)),
            *(("/v1/feedback", big_feedback(copy), {}, {413}) for copy in range(4)),  # need more than the queue
            *(("/v1/feedback", big_feedback(copy, 500), {}, {200}) for copy in range(4, 8)),
            (TRACES, b'{"resourceSpans": [' + b"{}," * (5 << 20) + b"{}]}", {"Content-Type": "application/json"},
             {413}),
        ]
        answers: list[list[int]] = [[] for _ in attacks]
        clients = [
            threading.Thread(target=send_until_answered, args=(sidecar.port, path, body, headers, answers[index]))
            for index, (path, body, headers, _) in enumerate(attacks)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wait_for(lambda: json.loads(get(sidecar.url, "/status")[1])["spans_awaiting_conversion"] == 0, 300,
                 "the conversion of what was accepted")
        peak_kib = memory_kib(pid, "VmHWM")
        assert get(sidecar.url, "/ready")[0] == 200
    finally:
        output = sidecar.stop(signal.SIGTERM)
    assert sidecar.process.returncode == 0, output
    for (path, _, _, expected), answer in zip(attacks, answers, strict=True):
        assert answer and answer[0] in expected, (path, answer)
    # The bound (docs/operations.md): four times the queue (requests being read, decoded and committed, and
    # what the allocators keep of them: 14 runs peaked at +139 to +353 MiB in all, up to 3.1x the queue over
    # the rest of the bound, the spread set by how the requests' decoding overlaps), a conversion batch
    # twice (its rows, the Parquet file being built), the de-duplication window (~128 bytes a key) and
    # 64 MiB, over the idle process.
    bound_kib = (4 * QUEUE + 2 * ROLL + DEDUP_WINDOW * 128 + 64 * MIB) // 1024
    grown_mib = (peak_kib - base_kib) / 1024
    print(f"memory: base {base_kib / 1024:.0f} MiB, peak {peak_kib / 1024:.0f} MiB (+{grown_mib:.0f} MiB), "
          f"bound +{bound_kib / 1024:.0f} MiB")
    assert peak_kib - base_kib < bound_kib, f"peak {peak_kib} KiB over a base of {base_kib} KiB"
    assert len(span_keys(data)) == 50 + 4 * 3_000 + 2 * 300_000


def test_idle_uploads_hold_neither_the_queue_nor_a_thread_for_long(tmp_path: Path) -> None:
    """Four connections announcing 16 MiB and sending a byte now and then once held the whole 64 MiB queue."""
    data = tmp_path / "data"
    sidecar = start_sidecar_process(data, "--body-timeout", "3")
    idle: list[socket.socket] = []
    try:
        for _ in range(4):
            connection = socket.create_connection(("127.0.0.1", sidecar.port), timeout=30)
            connection.sendall(
                f"POST {TRACES} HTTP/1.1\r\nHost: x\r\nContent-Type: {PROTOBUF}\r\nContent-Length: {16 * MIB}\r\n\r\n"
                .encode() + b"\x0a"
            )
            idle.append(connection)
        uploads_began = time.monotonic()
        wait_for(lambda: json.loads(get(sidecar.url, "/status")[1])["queue_bytes"] == 4, 10, "the idle uploads' bytes")
        waits = []
        for _ in range(5):
            started = time.monotonic()
            status, _, answer = post(sidecar.port, TRACES, otlp_body(sdk_spans(10)))
            waits.append(time.monotonic() - started)
            assert status == 200 and ExportTraceServiceResponse.FromString(answer).partial_success.rejected_spans == 0
        trickled = 0
        while time.monotonic() - uploads_began < 2.5:  # a byte every half second: every recv is quick
            for connection in idle:
                connection.sendall(b"\x00")
            trickled += 1
            time.sleep(0.5)
        answers = []
        for connection in idle:
            connection.settimeout(10)
            received = b""
            while chunk := connection.recv(65536):  # the answer, then the close
                received += chunk
            answers.append(received)
        cut_after = time.monotonic() - uploads_began
        status_after = json.loads(get(sidecar.url, "/status")[1])
    finally:
        for connection in idle:
            connection.close()
        output = sidecar.stop(signal.SIGTERM)
    assert sidecar.process.returncode == 0, output
    print(f"a valid client's wait while 4 idle uploads hold connections: max {max(waits) * 1000:.0f} ms "
          f"(median {sorted(waits)[2] * 1000:.0f} ms); idle uploads cut after {cut_after:.1f} s")
    assert max(waits) < 2.0, waits
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
    assert all(b"did not arrive within 3 s" in answer for answer in answers)
    assert 3.0 <= cut_after < 8.0 and trickled >= 4
    assert status_after["queue_bytes"] == 0
    assert len(span_keys(data)) == 50
