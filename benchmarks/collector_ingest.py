"""Collector sidecar under OTLP/HTTP load: durable ingest throughput, Agent Lightning's store side by side,
backpressure under many clients, and what survives a ``kill -9``.

Targets (issue 6, "Performance"):

* **ingest**: spans per CPU-second of the sidecar process (``tracelearn collector serve``), durable
  (a request is answered 200 only after its body is fsynced into the write-ahead request log) and
  converted into Parquet (behind the answers, ``TRACELEARN_ROLL_SECONDS`` 2 s here): the verdict
  counts the server's CPU until every acknowledged span is in Parquet. Goal: >= 20,000 spans per
  CPU-second on the 2-core development machine. After the run the sidecar is stopped with SIGTERM
  and every acknowledged span is looked up in the Parquet dataset: present exactly once.
* **compare**: the same bodies, the same client, the same concurrency against Agent Lightning 0.3.0's
  store server (``agl store``, OTLP/HTTP protobuf on ``/v1/traces``, in ``benchmarks/.venv-agl``):
  ratio of throughput (ours / agl), goal >= 3x, while ours is durable and its memory backend is not.
* **load**: many concurrent clients (64 connections) for a bounded time against a sidecar with a small
  write queue (``--queue-bytes``), so it answers 429 with ``Retry-After``; clients wait as told and
  resend. Reports accepted, rejected-with-retry, p50/p99 latency, and that no acknowledged span is lost.
* **crash**: clients ingest, the server is SIGKILLed mid-stream, restarted on the same data, and the
  bodies not acknowledged before the kill are resent (as an OTLP client retries); counts acknowledged
  spans missing and duplicated, for ours and for ``agl store`` (which keeps spans in memory).

The spans are real SDK spans of whole agent rollouts (``exporter_cost.build_spans``: a workflow root,
4-6 Traceloop 0.62 ``openai.chat`` spans with ``gen_ai.input.messages`` / ``gen_ai.output.messages``
JSON over a growing conversation, token counts, tool spans, a reward span, rollout identity on every
span; ~2.5 KB per span encoded, ~4.8 KB per LLM span), encoded once with the SDK's OTLP encoder into
``ExportTraceServiceRequest`` bodies of ``--batch`` spans (512: what ``BatchSpanProcessor`` sends).
Each span also carries ``agentlightning.rollout_id`` / ``agentlightning.attempt_id`` naming a rollout
that exists in the agl store (it drops spans without them, and refuses unknown rollouts), for both
targets. Every body sent is unique: body ``k`` is template ``k % T`` with the first 4 bytes of its
trace and span ids (parents too) replaced by the copy number ``k // T`` and the tracelearn rollout and
attempt ids suffixed with it, so no server sees a duplicate it could skip cheaply.

The load generator runs in separate processes (``multiprocessing`` spawn), each with its own
keep-alive ``http.client`` connections (one thread per connection), so it never shares the server's
GIL. Server CPU is read from ``/proc/PID/stat`` (utime + stime of the server process and its
descendants) when the clients start and when the last one finishes; for the sidecar also when
``/status`` says every acknowledged span is in Parquet (``spans_awaiting_conversion`` 0), and
through its exit (``os.wait4``). Nothing is asserted on timings: the script prints ratios and PASS /
BELOW TARGET lines.

    .venv/bin/python benchmarks/collector_ingest.py                      # all parts (~3 min)
    .venv/bin/python benchmarks/collector_ingest.py --quick              # short run of every part (~1 min)
    .venv/bin/python benchmarks/collector_ingest.py --parts ingest compare --spans 300000 --clients 8
    .venv/bin/python benchmarks/collector_ingest.py --parts load --load-seconds 60 --queue-bytes 4194304
    .venv/bin/python benchmarks/collector_ingest.py --parts crash

Importable (``sys.path`` holding ``benchmarks/``): ``build_workload``, ``measure_ingest``,
``compare_with_agl``, ``load_test``, ``crash_durability`` and their result dataclasses.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import dataset_files
from tracelearn.serving.http_server import free_port

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # exporter_cost sits next to this file; spawned clients re-import us
    sys.path.insert(0, str(HERE))

from exporter_cost import WORDS, build_spans  # noqa: E402

GOAL_SPANS_PER_CPU_SECOND = 20_000
GOAL_RATIO_VS_AGL = 3.0
TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
AGL_ROLLOUT_ID = "agentlightning.rollout_id"
AGL_ATTEMPT_ID = "agentlightning.attempt_id"
DEFAULT_AGL = HERE / ".venv-agl" / "bin" / "agl"
TRACELEARN = Path(sys.executable).parent / "tracelearn"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REQUEST_TIMEOUT_S = 120.0
# The sidecar's TRACELEARN_ROLL_SECONDS in these runs (see ``start_sidecar``).
ROLL_SECONDS = 2.0
# How long to wait, after the last answer, for every acknowledged span to be in Parquet.
CONVERSION_TIMEOUT_S = 600.0
# After this many connection failures in a row a client thread gives up (the server is gone).
MAX_CONSECUTIVE_ERRORS = 20

Target = Literal["tracelearn", "agl"]
Mix = Literal["llm", "rollouts"]
MIXES: tuple[Mix, ...] = ("llm", "rollouts")


# --- Workload: template requests, and the unique bodies made from them --------------------------------------


@dataclass(frozen=True)
class AglIdentity:
    """A rollout and attempt that exist in an agl store (``POST /v1/agl/rollouts``)."""

    rollout_id: str
    attempt_id: str


@dataclass(frozen=True)
class Workload:
    """``bodies`` unique OTLP request bodies, made from ``templates`` (serialized requests).

    Trace ``i`` of the templates (in order of first appearance) carries ``identities[i % len]`` as its
    Agent Lightning rollout and attempt.
    """

    templates: tuple[bytes, ...]
    bodies: int
    spans_per_template: tuple[int, ...]
    identities: tuple[AglIdentity, ...]
    traces: int
    mix: Mix = "llm"

    @property
    def spans(self) -> int:
        return sum(self.spans_in(k) for k in range(self.bodies))

    def spans_in(self, body: int) -> int:
        return self.spans_per_template[body % len(self.templates)]

    @property
    def bytes_per_span(self) -> float:
        return sum(len(t) for t in self.templates) / sum(self.spans_per_template)

    def with_bodies(self, bodies: int) -> Workload:
        return replace(self, bodies=bodies)

    def with_identities(self, identities: Sequence[AglIdentity]) -> Workload:
        """The same templates naming other agl rollouts (same lengths when the ids have the same form)."""
        requests = [ExportTraceServiceRequest.FromString(t) for t in self.templates]
        _stamp_identities(requests, identities)
        return replace(
            self, templates=tuple(bytes(r.SerializeToString()) for r in requests), identities=tuple(identities)
        )


def _flat_spans(request: ExportTraceServiceRequest) -> Iterator[Any]:
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            yield from scope_spans.spans


def _stamp_identities(requests: Sequence[ExportTraceServiceRequest], identities: Sequence[AglIdentity]) -> int:
    """Set (or add) the agl rollout/attempt attributes of every span; returns the number of traces."""
    trace_index: dict[bytes, int] = {}
    for request in requests:
        for span in _flat_spans(request):
            index = trace_index.setdefault(span.trace_id, len(trace_index))
            identity = identities[index % len(identities)]
            attributes = span.attributes
            if len(attributes) >= 2 and attributes[-1].key == AGL_ATTEMPT_ID:
                attributes[-2].value.string_value = identity.rollout_id
                attributes[-1].value.string_value = identity.attempt_id
            else:
                attributes.append(KeyValue(key=AGL_ROLLOUT_ID, value=AnyValue(string_value=identity.rollout_id)))
                attributes.append(KeyValue(key=AGL_ATTEMPT_ID, value=AnyValue(string_value=identity.attempt_id)))
    return len(trace_index)


def llm_call_spans(count: int, calls_per_rollout: int = 8, seed: int = 0) -> list[ReadableSpan]:
    """``count`` SDK spans: per rollout a small root and ``calls_per_rollout`` ~3 KB ``openai.chat`` spans.

    The LLM spans carry what Traceloop 0.62 records (GenAI operation, provider, request/response model,
    response id, finish reasons, temperature, max tokens, usage tokens, ``gen_ai.input.messages``: a
    system prompt and a ~2 KB user message, ``gen_ai.output.messages``: a ~1 KB answer, as JSON with
    parts) plus rollout identity; the shape of ``benchmarks/otlp_decode.py``'s spans, with varied text.
    """
    rng = random.Random(seed)
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-agent", "host.name": "h1"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai.v1", "0.62.4")

    def text(nbytes: int) -> str:
        words: list[str] = []
        size = 0
        while size < nbytes:
            words.append(rng.choice(WORDS))
            size += len(words[-1]) + 1
        return " ".join(words)

    rollout = 0
    while len(memory.get_finished_spans()) < count:
        identity = {sc.ROLLOUT_ID: f"ro-{rollout:08d}", sc.ATTEMPT_ID: f"ro-{rollout:08d}-a0",
                    sc.TASK_ID: f"task-{rollout % 64:04d}", sc.AGENT_NAME: "solver"}
        with tracer.start_as_current_span("solver.workflow", attributes=identity) as root:
            context = set_span_in_context(root)
            for call in range(calls_per_rollout):
                messages = [
                    {"role": "system", "parts": [{"type": "text", "content": "You are a careful solver."}]},
                    {"role": "user", "parts": [{"type": "text", "content": text(1900 + rng.randrange(400))}]},
                ]
                answer = [{"role": "assistant", "parts": [{"type": "text", "content": text(800 + rng.randrange(400))}],
                           "finish_reason": "stop"}]
                attributes: dict[str, Any] = {
                    **identity,
                    sc.GEN_AI_OPERATION_NAME: "chat",
                    sc.GEN_AI_PROVIDER_NAME: "openai",
                    sc.GEN_AI_REQUEST_MODEL: "gpt-4o-mini",
                    sc.GEN_AI_RESPONSE_MODEL: "gpt-4o-mini-2024-07-18",
                    sc.GEN_AI_RESPONSE_ID: f"chatcmpl-{rng.getrandbits(96):024x}",
                    sc.GEN_AI_RESPONSE_FINISH_REASONS: ("stop",),
                    "gen_ai.request.temperature": 0.7,
                    "gen_ai.request.max_tokens": 512,
                    sc.GEN_AI_USAGE_INPUT_TOKENS: 480 + call * 7,
                    sc.GEN_AI_USAGE_OUTPUT_TOKENS: 230,
                    "gen_ai.usage.total_tokens": 710 + call * 7,
                    sc.GEN_AI_INPUT_MESSAGES: json.dumps(messages),
                    sc.GEN_AI_OUTPUT_MESSAGES: json.dumps(answer),
                    "llm.is_streaming": False,
                    "server.address": "api.openai.com",
                }
                with tracer.start_as_current_span("openai.chat", context=context, kind=SpanKind.CLIENT,
                                                  attributes=attributes):
                    pass
        rollout += 1
    spans = list(memory.get_finished_spans()[:count])
    provider.shutdown()
    return spans


def placeholder_identities(count: int, seed: int = 0) -> list[AglIdentity]:
    """Ids shaped like agl's own (``ro-`` + 12 hex, ``at-`` + 8 hex), for runs without an agl store."""
    rng = random.Random(seed)
    return [AglIdentity(f"ro-{rng.getrandbits(48):012x}", f"at-{rng.getrandbits(32):08x}") for _ in range(count)]


def build_workload(
    spans: int,
    batch_size: int = 512,
    template_bodies: int = 8,
    identities: Sequence[AglIdentity] | None = None,
    mix: Mix = "llm",
    seed: int = 0,
) -> Workload:
    """Enough unique bodies of ``batch_size`` spans for ``spans`` spans, from ``template_bodies`` templates.

    The templates are whole rollouts of real SDK spans, cut into requests of ``batch_size`` spans and
    encoded by the SDK's OTLP encoder. ``mix``: ``llm`` (``llm_call_spans``: ~3 KB LLM spans, 8 per
    rollout, under a small root) or ``rollouts`` (``exporter_cost.build_spans`` without token ids:
    agent rollouts with LLM spans of ~4.8 KB over a growing conversation with tool calls, tool spans, a
    reward span; ~2.5 KB per span on average).
    """
    random.seed(seed)  # the SDK's RandomIdGenerator draws from the module-level generator
    count = batch_size * template_bodies
    sdk_spans = llm_call_spans(count, seed=seed) if mix == "llm" else build_spans(count, 0.0, seed)
    requests = [
        ExportTraceServiceRequest.FromString(encode_spans(sdk_spans[i : i + batch_size]).SerializeToString())
        for i in range(0, len(sdk_spans), batch_size)
    ]
    traces = len({span.context.trace_id for span in sdk_spans})
    identities = list(identities) if identities else placeholder_identities(traces, seed)
    _stamp_identities(requests, identities)
    tails = [span.span_id[4:] for request in requests for span in _flat_spans(request)]
    if len(set(tails)) != len(tails):  # copies replace the first 4 bytes: the rest must tell spans apart
        raise SystemExit(f"seed {seed}: two template spans share the last 4 bytes of their span id; use another")
    return Workload(
        templates=tuple(bytes(r.SerializeToString()) for r in requests),
        bodies=math.ceil(spans / batch_size),
        spans_per_template=tuple(sum(1 for _ in _flat_spans(r)) for r in requests),
        identities=tuple(identities),
        traces=traces,
        mix=mix,
    )


class BodyMaker:
    """Makes body ``k`` of a workload (and names its spans) without re-encoding any span."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self._requests = [ExportTraceServiceRequest.FromString(t) for t in workload.templates]
        # Per template: (span message, trace tail, span tail, parent tail, rollout attr, attempt attr).
        self._spans: list[list[tuple[Any, bytes, bytes, bytes, Any, Any]]] = []
        for request in self._requests:
            rows = []
            for span in _flat_spans(request):
                rollout = attempt = None
                for kv in span.attributes:
                    if kv.key == sc.ROLLOUT_ID:
                        rollout = (kv.value, kv.value.string_value)
                    elif kv.key == sc.ATTEMPT_ID:
                        attempt = (kv.value, kv.value.string_value)
                parent = span.parent_span_id[4:] if span.parent_span_id else b""
                rows.append((span, span.trace_id[4:], span.span_id[4:], parent, rollout, attempt))
            self._spans.append(rows)

    def _copy(self, body: int) -> tuple[int, bytes]:
        count = len(self._requests)
        return body % count, (body // count + 1).to_bytes(4, "big")

    def body(self, body: int) -> bytes:
        template, prefix = self._copy(body)
        suffix = f".{body // len(self._requests)}"
        for span, trace, own, parent, rollout, attempt in self._spans[template]:
            span.trace_id = prefix + trace
            span.span_id = prefix + own
            if parent:
                span.parent_span_id = prefix + parent
            if rollout is not None:
                rollout[0].string_value = rollout[1] + suffix
            if attempt is not None:
                attempt[0].string_value = attempt[1] + suffix
        return bytes(self._requests[template].SerializeToString())

    def keys(self, body: int) -> list[str]:
        """``trace_id + span_id`` (lowercase hex, 48 characters) of the spans of body ``body``."""
        template, prefix = self._copy(body)
        return [(prefix + trace).hex() + (prefix + own).hex() for _, trace, own, _, _, _ in self._spans[template]]


def decode_rows_rate(workload: Workload, repeat: int = 3) -> float:
    """Spans per CPU-second of the sidecar's own decode + row building (``decode_protobuf``, ``SpanColumns``)
    on the workload's template bodies, in this process, best of ``repeat``: the receiver's ceiling before
    any HTTP, spool or Parquet cost, and a gauge of how loaded the machine is while the benchmark runs.
    """
    from tracelearn.collector.otlp_decode import decode_protobuf
    from tracelearn.collector.span_rows import SpanColumns

    def once() -> None:
        for template in workload.templates:
            columns = SpanColumns()
            columns.add_all(decode_protobuf(template).records)
            columns.take()

    once()  # warm-up
    best = math.inf
    for _ in range(repeat):
        started = time.process_time()
        once()
        best = min(best, time.process_time() - started)
    return sum(workload.spans_per_template) / best


# --- Servers as processes ------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    pids, index = [pid], 0
    while index < len(pids):
        current = pids[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pids.extend(int(child) for child in (task / "children").read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants, all threads (``/proc/PID/stat``)."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{each}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def storage_write_bytes(pid: int) -> int:
    """Bytes ``pid`` and its descendants caused to be written to storage (``/proc/PID/io`` write_bytes)."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
    return total


@dataclass
class ServerExit:
    """How a server process ended: exit code and its whole-life CPU seconds (``os.wait4``)."""

    returncode: int
    cpu_s: float
    log_tail: str


@dataclass
class ServerProcess:
    """A server (the sidecar or ``agl store``) running as a child process, output in ``log``."""

    target: Target
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    data: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def write_bytes(self) -> int:
        return storage_write_bytes(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> ServerExit:
        """Send ``sig``, reap the process (SIGKILL after ``timeout``) and return its exit and CPU."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        status, usage = 0, None
        while self.process.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline = math.inf
            time.sleep(0.02)
        cpu = usage.ru_utime + usage.ru_stime if usage is not None else math.nan
        return ServerExit(self.process.returncode, cpu, log_tail(self.log))


def log_tail(path: Path, lines: int = 12) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def http_json(url: str, body: Any = None, timeout: float = 30.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_until(what: str, condition: Any, process: subprocess.Popen[bytes], log: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before {what}:\n{log_tail(log, 30)}")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
            answer = condition()
            if answer:
                return answer
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}:\n{log_tail(log, 30)}")


def start_sidecar(
    data: Path,
    log: Path,
    queue_bytes: int | None = None,
    extra: Sequence[str] = (),
    roll_seconds: float = ROLL_SECONDS,
) -> ServerProcess:
    """``tracelearn collector serve --data DATA --http 127.0.0.1:0 --grpc ''``; returns once ``/ready`` is 200.

    ``roll_seconds`` (``TRACELEARN_ROLL_SECONDS``): how old a request log segment gets before it is
    converted into Parquet; short, so the conversion runs during the run, as in a long-lived collector.
    """
    command = [str(TRACELEARN), "collector", "serve", "--data", str(data), "--http", "127.0.0.1:0", "--grpc", ""]
    if queue_bytes is not None:
        command += ["--queue-bytes", str(queue_bytes)]
    command += list(extra)
    env = {**os.environ, "TRACELEARN_ROLL_SECONDS": str(roll_seconds)}
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def banner() -> tuple[str, int] | None:
        match = re.search(r"OTLP/HTTP on http://([\d.]+):(\d+)", log.read_text(errors="replace"))
        return (match.group(1), int(match.group(2))) if match else None

    host, port = _wait_until("its OTLP/HTTP banner", banner, process, log, 60)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5) as response:
            return bool(response.status == 200)

    _wait_until("/ready", ready, process, log, 120)
    return ServerProcess("tracelearn", process, host, port, log, data)


def start_agl_store(log: Path, agl: Path = DEFAULT_AGL) -> ServerProcess:
    """``agl store --host 127.0.0.1 --port N`` (memory backend, its default); returns once healthy."""
    if not agl.exists():
        raise FileNotFoundError(f"{agl}: no agl command; run benchmarks/setup_agentlightning.sh once")
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    command = [str(agl), "store", "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = ServerProcess("agl", process, "127.0.0.1", port, log)
    _wait_until("agl health", lambda: http_json(f"{server.url}/v1/agl/health", timeout=5), process, log, 120)
    return server


def create_agl_rollouts(server: ServerProcess, count: int) -> list[AglIdentity]:
    """``count`` rollouts with a started attempt each, through agl's REST API."""
    created = []
    for index in range(count):
        answer = http_json(f"{server.url}/v1/agl/rollouts", {"input": {"task": index}})
        created.append(AglIdentity(answer["rollout_id"], answer["attempt"]["attempt_id"]))
    return created


def agl_statistics(server: ServerProcess) -> dict[str, Any]:
    """The store's ``/v1/agl/statistics`` (``total_spans``, ``total_rollouts``, ...)."""
    answer: dict[str, Any] = http_json(f"{server.url}/v1/agl/statistics")
    return answer


def wait_for_conversion(server: ServerProcess, timeout: float = CONVERSION_TIMEOUT_S) -> tuple[float, float] | None:
    """Wait until the sidecar has every acknowledged span in Parquet; (its CPU seconds then, seconds waited)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status = sidecar_status(server)
        if status["spans_awaiting_conversion"] == 0 and status["conversion_backlog_bytes"] == 0:
            return server.cpu_seconds(), time.monotonic() - started
        time.sleep(0.05)
    return None


def sidecar_status(server: ServerProcess) -> dict[str, Any]:
    answer: dict[str, Any] = http_json(f"{server.url}/status")
    return answer


def start_target(target: Target, workdir: Path, workload: Workload, queue_bytes: int | None = None,
                 agl: Path = DEFAULT_AGL) -> tuple[ServerProcess, Workload]:
    """Start ``target`` fresh under ``workdir``; for agl, create the workload's rollouts in it (and rename them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if target == "tracelearn":
        return start_sidecar(workdir / "data", workdir / "sidecar.log", queue_bytes), workload
    server = start_agl_store(workdir / "agl.log", agl)
    try:
        identities = create_agl_rollouts(server, len(workload.identities))
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server, workload.with_identities(identities)


# --- Load generator: client processes, one keep-alive connection per thread ----------------------------------


@dataclass(frozen=True)
class ClientPlan:
    """What one client process sends: per thread the bodies (``None``: new ones until the deadline)."""

    host: str
    port: int
    workload: Workload
    threads: tuple[tuple[int, tuple[int, ...] | None], ...]  # (global thread index, bodies)
    total_threads: int
    duration_s: float | None = None
    stop_on_connection_error: bool = False


@dataclass
class ClientReport:
    """What clients saw, merged over threads and processes."""

    acked: list[int] = field(default_factory=list)  # bodies answered 200
    accepted_latency_s: list[float] = field(default_factory=list)  # per accepted attempt
    rejected_latency_s: list[float] = field(default_factory=list)  # per 429/503 attempt
    body_latency_s: list[float] = field(default_factory=list)  # first attempt to 200, retries included
    statuses: Counter[str] = field(default_factory=Counter)
    partial_rejected_spans: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    unanswered: list[int] = field(default_factory=list)  # bodies sent whose answer never came
    abandoned: list[int] = field(default_factory=list)  # rejected bodies given up at the deadline
    failed: list[int] = field(default_factory=list)  # bodies answered with another error status
    started_at: float = math.inf
    finished_at: float = 0.0

    def merge(self, other: ClientReport) -> None:
        self.acked += other.acked
        self.accepted_latency_s += other.accepted_latency_s
        self.rejected_latency_s += other.rejected_latency_s
        self.body_latency_s += other.body_latency_s
        self.statuses.update(other.statuses)
        self.partial_rejected_spans += other.partial_rejected_spans
        self.errors += other.errors
        self.error_samples += other.error_samples[: max(0, 5 - len(self.error_samples))]
        self.unanswered += other.unanswered
        self.abandoned += other.abandoned
        self.failed += other.failed
        self.started_at = min(self.started_at, other.started_at)
        self.finished_at = max(self.finished_at, other.finished_at)

    @property
    def rejected_attempts(self) -> int:
        return self.statuses["429"] + self.statuses["503"]


def _connect(host: str, port: int) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    connection.connect()
    assert connection.sock is not None
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _client_thread(
    plan: ClientPlan,
    thread: int,
    bodies: Sequence[int] | None,
    encoded: dict[int, bytes],
    maker: BodyMaker,
    lock: threading.Lock,
    deadline: float,
    acked_spans: Any,
    report: ClientReport,
) -> None:
    """Send this thread's bodies in turn; on 429/503 wait ``Retry-After`` and resend the same body."""
    connection: http.client.HTTPConnection | None = None
    headers = {"Content-Type": PROTOBUF}
    consecutive_errors = 0
    sequence = iter(bodies) if bodies is not None else (thread + n * plan.total_threads for n in range(1 << 40))
    try:
        for body_index in sequence:
            if plan.duration_s is not None and time.monotonic() >= deadline:
                break
            if body_index in encoded:
                body = encoded.pop(body_index)
            else:
                with lock:
                    body = maker.body(body_index)
            first_attempt = time.monotonic()
            report.started_at = min(report.started_at, first_attempt)
            while True:
                sent_at = time.monotonic()
                try:
                    if connection is None:
                        connection = _connect(plan.host, plan.port)
                    connection.request("POST", TRACES_PATH, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    status = response.status
                    retry_after = response.getheader("Retry-After")
                    if response.getheader("Connection", "").lower() == "close":
                        connection.close()
                        connection = None
                except (OSError, http.client.HTTPException) as error:
                    report.errors += 1
                    consecutive_errors += 1
                    if len(report.error_samples) < 5:
                        report.error_samples.append(f"{type(error).__name__}: {error}")
                    if connection is not None:
                        connection.close()
                        connection = None
                    if plan.stop_on_connection_error or consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                        report.unanswered.append(body_index)
                        return
                    time.sleep(0.05 * consecutive_errors)
                    continue
                consecutive_errors = 0
                answered_at = time.monotonic()
                report.statuses[str(status)] += 1
                if status == 200:
                    report.accepted_latency_s.append(answered_at - sent_at)
                    report.body_latency_s.append(answered_at - first_attempt)
                    if payload:
                        report.partial_rejected_spans += ExportTraceServiceResponse.FromString(
                            payload
                        ).partial_success.rejected_spans
                    report.acked.append(body_index)
                    report.finished_at = max(report.finished_at, answered_at)
                    with acked_spans.get_lock():
                        acked_spans.value += plan.workload.spans_in(body_index)
                    break
                if status in (429, 503):
                    report.rejected_latency_s.append(answered_at - sent_at)
                    wait = float(retry_after) if retry_after else 1.0
                    if plan.duration_s is not None and answered_at + wait >= deadline:
                        report.abandoned.append(body_index)
                        report.finished_at = max(report.finished_at, answered_at)
                        return
                    time.sleep(wait)
                    continue
                report.failed.append(body_index)
                if len(report.error_samples) < 5:
                    report.error_samples.append(f"HTTP {status}: {payload[:200]!r}")
                break
    finally:
        if connection is not None:
            connection.close()


def _client_process(plan: ClientPlan, go: Any, go_at: Any, ready: Any, results: Any, acked_spans: Any) -> None:
    """One client process: encode its bodies, wait for ``go``, run one thread per connection."""
    try:
        maker = BodyMaker(plan.workload)
        encoded: dict[int, bytes] = {}
        for _, bodies in plan.threads:
            for body_index in bodies or ():
                encoded[body_index] = maker.body(body_index)
        ready.put(os.getpid())
        go.wait()
        deadline = go_at.value + (plan.duration_s or 0.0)
        reports = [ClientReport() for _ in plan.threads]
        lock = threading.Lock()  # bodies made on the fly (timed runs) reuse the maker's messages
        threads = [
            threading.Thread(
                target=_client_thread,
                args=(plan, index, bodies, encoded, maker, lock, deadline, acked_spans, reports[n]),
                daemon=True,
            )
            for n, (index, bodies) in enumerate(plan.threads)
        ]
        for each in threads:
            each.start()
        for each in threads:
            each.join()
        merged = ClientReport()
        for each_report in reports:
            merged.merge(each_report)
        results.put(merged)
    except BaseException as error:  # reported to the parent, which would otherwise wait forever
        results.put(f"client process {os.getpid()} failed: {type(error).__name__}: {error}")
        raise


@dataclass
class ClientRun:
    """A whole load-generator run: the merged report, and the server CPU over it."""

    report: ClientReport
    go_at: float
    server_cpu_s: float
    server_cpu_at_go: float
    killed_at_spans: int | None = None

    @property
    def wall_s(self) -> float:
        return max(self.report.finished_at - self.go_at, 1e-9)


def run_clients(
    server: ServerProcess,
    workload: Workload,
    connections: int,
    processes: int | None = None,
    bodies: Sequence[int] | None = None,
    duration_s: float | None = None,
    stop_on_connection_error: bool = False,
    kill_after_spans: int | None = None,
) -> ClientRun:
    """Drive ``server`` with ``connections`` keep-alive connections spread over ``processes`` processes.

    ``bodies``: send exactly these (round-robin over connections); ``duration_s``: new bodies until then.
    ``kill_after_spans``: SIGKILL the server once clients have that many spans acknowledged.
    """
    processes = min(processes or connections, connections)
    context = mp.get_context("spawn")
    go, ready, results = context.Event(), context.Queue(), context.Queue()
    go_at = context.Value("d", 0.0)
    acked_spans = context.Value("q", 0)
    assignment: list[list[tuple[int, tuple[int, ...] | None]]] = [[] for _ in range(processes)]
    for thread in range(connections):
        mine = tuple(bodies[thread::connections]) if bodies is not None else None
        assignment[thread % processes].append((thread, mine))
    workers = [
        context.Process(
            target=_client_process,
            args=(
                ClientPlan(server.host, server.port, workload, tuple(threads), connections, duration_s,
                           stop_on_connection_error),
                go, go_at, ready, results, acked_spans,
            ),
            daemon=True,
        )
        for threads in assignment
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=600)
        cpu_at_go = server.cpu_seconds()
        go_at.value = time.monotonic()
        go.set()
        killed_at = None
        if kill_after_spans is not None:
            give_up = time.monotonic() + 600
            while acked_spans.value < kill_after_spans and time.monotonic() < give_up:
                time.sleep(0.002)
            killed_at = acked_spans.value
            server.stop(signal.SIGKILL)
        merged = ClientReport()
        for _ in workers:
            answer = results.get(timeout=3600)
            if isinstance(answer, str):
                raise RuntimeError(answer)
            merged.merge(answer)
        cpu_after = server.cpu_seconds() if server.process.returncode is None else math.nan
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    return ClientRun(merged, go_at.value, cpu_after - cpu_at_go, cpu_at_go, killed_at)


# --- Verification against the Parquet dataset ------------------------------------------------------------


@dataclass(frozen=True)
class DatasetCheck:
    """Acknowledged spans against the rows of the Parquet dataset."""

    acknowledged: int
    rows: int
    missing: int  # acknowledged, not in the dataset
    duplicated: int  # acknowledged spans present more than once (extra rows)
    unacknowledged_rows: int  # rows of spans never acknowledged (e.g. in flight at a kill)
    files: int

    @property
    def exact(self) -> bool:
        return self.missing == 0 and self.duplicated == 0


def dataset_key_counts(spans_root: Path) -> tuple[Counter[str], int]:
    """``trace_id + span_id`` of every row of the spans dataset under ``spans_root``, with multiplicity."""
    counts: Counter[str] = Counter()
    files = dataset_files(spans_root) if spans_root.exists() else []
    for path in files:
        table = pq.read_table(path, columns=["trace_id", "span_id"])
        keys = pc.binary_join_element_wise(table["trace_id"], table["span_id"], pa.scalar(""))
        counts.update(keys.to_pylist())
    return counts, len(files)


def check_dataset(spans_root: Path, maker: BodyMaker, acked_bodies: Sequence[int]) -> DatasetCheck:
    counts, files = dataset_key_counts(spans_root)
    acknowledged = [key for body in acked_bodies for key in maker.keys(body)]
    wanted = set(acknowledged)
    missing = sum(1 for key in wanted if key not in counts)
    duplicated = sum(counts[key] - 1 for key in wanted if counts.get(key, 0) > 1)
    duplicated += len(acknowledged) - len(wanted)  # a body acknowledged twice would show here
    unacknowledged = sum(n for key, n in counts.items() if key not in wanted)
    return DatasetCheck(len(acknowledged), sum(counts.values()), missing, duplicated, unacknowledged, files)


# --- Part 1 and 2: ingest throughput, and side by side with agl store -----------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class IngestResult:
    """One ingest run against one target."""

    target: Target
    clients: int
    spans_sent: int
    spans_acked: int
    bodies_acked: int
    wall_s: float
    server_cpu_s: float  # CPU of the server from the first request to the last answer
    # The sidecar: ... until every acknowledged span is in Parquet (its conversion runs behind the answers)
    server_cpu_in_parquet_s: float | None
    server_cpu_through_exit_s: float | None  # ... to its exit
    p50_ms: float
    p99_ms: float
    bytes_per_span: float
    write_bytes: int  # bytes the server process wrote to storage (/proc/PID/io) during the run
    durable: bool  # acknowledged only once on disk
    stored_spans: int  # rows in the dataset (ours) / total_spans in the store (agl)
    check: DatasetCheck | None
    report: ClientReport
    workload: Workload = field(repr=False)  # as sent (for agl: naming the rollouts created in that store)
    notes: list[str] = field(default_factory=list)

    @property
    def spans_per_cpu_s(self) -> float:
        return self.spans_acked / self.server_cpu_s if self.server_cpu_s > 0 else math.nan

    @property
    def spans_per_cpu_s_in_parquet(self) -> float | None:
        cpu = self.server_cpu_in_parquet_s
        return self.spans_acked / cpu if cpu else None

    @property
    def spans_per_cpu_s_through_exit(self) -> float | None:
        cpu = self.server_cpu_through_exit_s
        return self.spans_acked / cpu if cpu else None

    @property
    def spans_per_wall_s(self) -> float:
        return self.spans_acked / self.wall_s


def measure_ingest(
    target: Target,
    workload: Workload,
    clients: int = 4,
    workdir: Path | None = None,
    agl: Path = DEFAULT_AGL,
    keep: bool = False,
) -> IngestResult:
    """Post every body of ``workload`` to a fresh ``target`` over ``clients`` connections (one process each).

    For the sidecar: CPU to the last answer and through its SIGTERM exit, then every acknowledged span
    is looked up in the Parquet dataset. For agl: the store's span count after the run.
    """
    with _workdir(workdir, keep) as directory:
        server, workload = start_target(target, directory / target, workload, agl=agl)
        writes_before = server.write_bytes()
        cpu_in_parquet = None
        try:
            run = run_clients(server, workload, clients, bodies=range(workload.bodies))
            writes = server.write_bytes() - writes_before
            notes: list[str] = []
            if target == "agl":
                stats = agl_statistics(server)
                stored, durable = int(stats["total_spans"]), False
                notes.append(f"agl {stats['name']}: total_spans {stats['total_spans']}, "
                             f"{stats.get('total_span_bytes', 0) / 2**20:.0f} MiB of spans in memory")
            else:
                in_parquet = wait_for_conversion(server)
                status = sidecar_status(server)
                notes.append(f"sidecar /status: accepted {status['spans_accepted']}, duplicate "
                             f"{status['spans_duplicate']}, rejected {status['spans_rejected']}, "
                             f"commits {status['commits']}, files written {status['files_rolled']}, "
                             f"quarantined {status['spans_quarantined']}")
                if in_parquet is not None:
                    cpu_in_parquet = in_parquet[0] - run.server_cpu_at_go
                    notes.append(f"all acknowledged spans in Parquet {in_parquet[1]:.1f} s after the last answer")
                durable = True
        finally:
            ended = server.stop(signal.SIGTERM)
        check = None
        through_exit = None
        if target == "tracelearn":
            through_exit = ended.cpu_s - run.server_cpu_at_go
            check = check_dataset(directory / target / "data" / "spans", BodyMaker(workload), run.report.acked)
            stored = check.rows
            if ended.returncode != 0:
                notes.append(f"the sidecar exited {ended.returncode}: {ended.log_tail}")
        acked_spans = sum(workload.spans_in(b) for b in run.report.acked)
        latencies = run.report.accepted_latency_s
        return IngestResult(
            target=target,
            clients=clients,
            spans_sent=workload.spans,
            spans_acked=acked_spans,
            bodies_acked=len(run.report.acked),
            wall_s=run.wall_s,
            server_cpu_s=run.server_cpu_s,
            server_cpu_in_parquet_s=cpu_in_parquet,
            server_cpu_through_exit_s=through_exit,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            bytes_per_span=workload.bytes_per_span,
            write_bytes=writes,
            durable=durable,
            stored_spans=stored,
            check=check,
            report=run.report,
            workload=workload,
            notes=notes,
        )


@contextlib.contextmanager
def _workdir(workdir: Path | None, keep: bool) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    directory = Path(tempfile.mkdtemp(prefix="tracelearn-collector-bench-"))
    try:
        yield directory
    finally:
        if keep:
            print(f"  (kept {directory})")
        else:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class ComparisonResult:
    """The same workload against both targets."""

    ours: IngestResult
    agl: IngestResult

    @property
    def ratio(self) -> float:
        """Ours over agl, spans per wall second (the same client, the same concurrency)."""
        return self.ours.spans_per_wall_s / self.agl.spans_per_wall_s

    @property
    def cpu_ratio(self) -> float:
        """Ours (all the way into Parquet) over agl (spans held in memory), spans per server CPU-second."""
        ours = self.ours.spans_per_cpu_s_in_parquet or self.ours.spans_per_cpu_s
        return ours / self.agl.spans_per_cpu_s


def compare_with_agl(
    spans: int = 150_000,
    clients: int = 4,
    batch_size: int = 512,
    workdir: Path | None = None,
    agl: Path = DEFAULT_AGL,
    workload: Workload | None = None,
) -> ComparisonResult:
    """agl store then the sidecar, the same bodies (naming rollouts that exist in that agl store)."""
    workload = workload or build_workload(spans, batch_size)
    agl_result = measure_ingest("agl", workload, clients, workdir / "agl-run" if workdir else None, agl)
    # Byte for byte the bodies agl got (the agl attributes name its rollouts; ours ignores them).
    ours = measure_ingest("tracelearn", agl_result.workload, clients, workdir / "ours-run" if workdir else None)
    return ComparisonResult(ours, agl_result)


# --- Part 3: load test with backpressure ------------------------------------------------------------------


@dataclass
class LoadResult:
    """Many clients for a bounded time against a sidecar with a small write queue."""

    connections: int
    duration_s: float
    queue_bytes: int
    report: ClientReport
    wall_s: float
    server_cpu_s: float
    check: DatasetCheck
    spans_acked: int

    @property
    def accepted_requests(self) -> int:
        return self.report.statuses["200"]

    @property
    def rejected_with_retry(self) -> int:
        return self.report.rejected_attempts


def load_test(
    connections: int = 64,
    duration_s: float = 30.0,
    queue_bytes: int = 8 * 2**20,
    processes: int = 4,
    batch_size: int = 512,
    workdir: Path | None = None,
    workload: Workload | None = None,
) -> LoadResult:
    """``connections`` clients send new bodies for ``duration_s``; rejected ones wait ``Retry-After`` and resend.

    A body still refused at the deadline is abandoned (not acknowledged, so not counted). Then the
    sidecar is stopped (SIGTERM) and every acknowledged span is looked up in the dataset.
    """
    workload = workload or build_workload(batch_size, batch_size)
    with _workdir(workdir, False) as directory:
        server = start_sidecar(directory / "data", directory / "sidecar.log", queue_bytes)
        try:
            run = run_clients(server, workload, connections, processes, duration_s=duration_s)
        finally:
            server.stop(signal.SIGTERM)
        check = check_dataset(directory / "data" / "spans", BodyMaker(workload), run.report.acked)
    return LoadResult(
        connections, duration_s, queue_bytes, run.report, run.wall_s, run.server_cpu_s, check,
        sum(workload.spans_in(b) for b in run.report.acked),
    )


# --- Part 4: durability after a kill -9 -----------------------------------------------------------------------


@dataclass
class CrashResult:
    """Acknowledged spans before a SIGKILL, and what a restart finds of them."""

    target: Target
    spans_acked_before_kill: int
    bodies_unanswered_at_kill: int
    spans_resent_after_restart: int
    spans_missing: int  # acknowledged before the kill, absent after the restart
    spans_duplicated: int  # extra copies of any span in the end
    restart_s: float  # from the restart to ready
    final_rows: int
    notes: list[str] = field(default_factory=list)

    @property
    def lost_share(self) -> float:
        return self.spans_missing / self.spans_acked_before_kill if self.spans_acked_before_kill else math.nan


def crash_durability(
    target: Target,
    spans: int = 60_000,
    clients: int = 4,
    kill_at: float = 0.5,
    batch_size: int = 512,
    workdir: Path | None = None,
    agl: Path = DEFAULT_AGL,
    workload: Workload | None = None,
) -> CrashResult:
    """Ingest, SIGKILL ``target`` once ``kill_at`` of the spans are acknowledged, restart on the same data.

    Sidecar: the bodies not acknowledged before the kill (those in flight included, some of which may
    already be durable) are resent to the restarted sidecar, which is then stopped with SIGTERM; the
    dataset must hold every span exactly once. agl store: after the restart its span count is read
    (it holds spans in memory only; its rollouts are gone too, so nothing can be resent).
    """
    workload = (workload or build_workload(spans, batch_size)).with_bodies(math.ceil(spans / batch_size))
    threshold = int(workload.spans * kill_at)
    with _workdir(workdir, False) as directory:
        server, workload = start_target(target, directory / target, workload, agl=agl)
        maker = BodyMaker(workload)
        try:
            first = run_clients(server, workload, clients, bodies=range(workload.bodies),
                                stop_on_connection_error=True, kill_after_spans=threshold)
        finally:
            server.stop(signal.SIGKILL)
        acked_before = sum(workload.spans_in(b) for b in first.report.acked)
        unanswered = len(first.report.unanswered)
        notes = [f"killed with {first.killed_at_spans} spans acknowledged (threshold {threshold}); "
                 f"{unanswered} bodies in flight"]
        started = time.monotonic()
        if target == "agl":
            restarted = start_agl_store(directory / target / "agl-restart.log", agl)
            restart_s = time.monotonic() - started
            try:
                stats = agl_statistics(restarted)
            finally:
                restarted.stop(signal.SIGTERM)
            present = int(stats["total_spans"])
            notes.append(f"after the restart: {stats['total_rollouts']} rollouts, {present} spans in the store")
            return CrashResult(target, acked_before, unanswered, 0, max(acked_before - present, 0), 0,
                               restart_s, present, notes)
        data = directory / target / "data"
        restarted = start_sidecar(data, directory / target / "sidecar-restart.log")
        restart_s = time.monotonic() - started
        replay = re.search(r"start-up replay done in ([\d.]+) s \((\d+) keys", restarted.log.read_text())
        if replay:
            notes.append(f"restart replayed the spool in {replay.group(1)} s ({replay.group(2)} keys seeded)")
        acked = set(first.report.acked)
        rest = [b for b in range(workload.bodies) if b not in acked]
        try:
            second = run_clients(restarted, workload, clients, bodies=rest)
        finally:
            ended = restarted.stop(signal.SIGTERM)
        if ended.returncode != 0:
            notes.append(f"the restarted sidecar exited {ended.returncode}: {ended.log_tail}")
        if len(second.report.acked) != len(rest):
            notes.append(f"after the restart {len(rest) - len(second.report.acked)} resent bodies were not "
                         f"acknowledged: {second.report.error_samples}")
        before = check_dataset(data / "spans", maker, first.report.acked)
        every = check_dataset(data / "spans", maker, first.report.acked + second.report.acked)
        return CrashResult(
            target, acked_before, unanswered, sum(workload.spans_in(b) for b in rest), before.missing,
            every.duplicated, restart_s, every.rows, notes,
        )


# --- Report ---------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "BELOW TARGET"


def print_ingest_table(results: Sequence[IngestResult]) -> None:
    head = (f"{'target':<24}{'clients':>8}{'spans acked':>13}{'wall s':>8}{'server CPU s':>14}"
            f"{'spans/CPU-s':>13}{'spans/s wall':>14}{'p50 ms':>8}{'p99 ms':>8}{'disk MiB':>10}  durable")
    print(head)
    print("-" * len(head))
    for r in results:
        name = "tracelearn sidecar" if r.target == "tracelearn" else "agl store (memory)"
        print(f"{name:<24}{r.clients:>8}{r.spans_acked:>13,}{r.wall_s:>8.2f}{r.server_cpu_s:>14.2f}"
              f"{r.spans_per_cpu_s:>13,.0f}{r.spans_per_wall_s:>14,.0f}{r.p50_ms:>8.0f}{r.p99_ms:>8.0f}"
              f"{r.write_bytes / 2**20:>10.0f}  {'yes (fsync before 200)' if r.durable else 'no (memory only)'}")
        if r.target == "tracelearn" and r.server_cpu_in_parquet_s:
            in_parquet = r.spans_per_cpu_s_in_parquet or math.nan
            print(f"{'  ... all in Parquet':<24}{'':>8}{'':>13}{'':>8}{r.server_cpu_in_parquet_s:>14.2f}"
                  f"{in_parquet:>13,.0f}   (adds the conversion into Parquet, behind the answers)")
        if r.target == "tracelearn" and r.server_cpu_through_exit_s:
            through = r.spans_per_cpu_s_through_exit or math.nan
            print(f"{'  ... through its exit':<24}{'':>8}{'':>13}{'':>8}{r.server_cpu_through_exit_s:>14.2f}"
                  f"{through:>13,.0f}   (adds the shutdown)")


def print_ingest_details(r: IngestResult) -> None:
    for note in r.notes:
        print(f"  {note}")
    rep = r.report
    if rep.errors or rep.failed or rep.unanswered or rep.partial_rejected_spans or rep.rejected_attempts:
        print(f"  client: statuses {dict(rep.statuses)}, connection errors {rep.errors}, failed bodies "
              f"{len(rep.failed)}, unanswered {len(rep.unanswered)}, partial-success rejected spans "
              f"{rep.partial_rejected_spans}; {rep.error_samples}")
    if r.check is not None:
        c = r.check
        print(f"  dataset: {c.rows:,} rows in {c.files} Parquet files; acknowledged {c.acknowledged:,}: missing "
              f"{c.missing}, duplicated {c.duplicated}, rows never acknowledged {c.unacknowledged_rows}"
              f" -> {'every acknowledged span exactly once' if c.exact else 'NOT EXACT'}")
    elif r.target == "agl":
        print(f"  store: {r.stored_spans:,} spans held for {r.spans_acked:,} acknowledged "
              f"({'all' if r.stored_spans == r.spans_acked else 'NOT all'}); "
              f"{r.write_bytes / 2**20:.1f} MiB written to storage by its process during the run")


def print_ingest_verdict(r: IngestResult, gauge: float | None = None) -> None:
    # Judged on spans in Parquet per CPU-second: acknowledging is cheaper, but the conversion must keep up.
    rate = r.spans_per_cpu_s_in_parquet or math.nan
    share = f"; {rate / gauge:.2f} of the decode + rows gauge" if gauge else ""
    print(f"{verdict(rate >= GOAL_SPANS_PER_CPU_SECOND and bool(r.check and r.check.exact))}: "
          f"ingest {rate:,.0f} spans per server CPU-second all the way into Parquet = "
          f"{rate / GOAL_SPANS_PER_CPU_SECOND:.2f}x the goal of {GOAL_SPANS_PER_CPU_SECOND:,} (acknowledged, durable "
          f"in the request log: {r.spans_per_cpu_s:,.0f}{share}); every acknowledged span in Parquet exactly once: "
          f"{'yes' if r.check and r.check.exact else 'NO'}")


def print_comparison(c: ComparisonResult) -> None:
    print(f"ratio ours / agl store: {c.ratio:.2f}x spans per wall second, {c.cpu_ratio:.2f}x spans per server "
          f"CPU-second (same bodies, same client, {c.ours.clients} connections)")
    print(f"{verdict(c.ratio >= GOAL_RATIO_VS_AGL)}: {c.ratio:.2f}x agl store's throughput (goal >= "
          f"{GOAL_RATIO_VS_AGL:.0f}x), ours durable (fsync before each 200, {c.ours.write_bytes / 2**20:.0f} MiB "
          f"written), agl not ({c.agl.write_bytes / 2**20:.1f} MiB written; its memory backend keeps spans in "
          f"process memory, the only other backend is MongoDB)")


def print_load(r: LoadResult) -> None:
    rep = r.report
    e2e = rep.body_latency_s
    print(f"{'connections':>12}{'seconds':>9}{'queue MiB':>11}{'accepted req':>14}{'spans acked':>13}"
          f"{'rejected 429/503':>18}{'abandoned':>11}{'errors':>8}{'p50 ms':>8}{'p99 ms':>8}{'spans/s':>9}")
    print(f"{r.connections:>12}{r.wall_s:>9.1f}{r.queue_bytes / 2**20:>11.0f}{r.accepted_requests:>14,}"
          f"{r.spans_acked:>13,}{r.rejected_with_retry:>18,}{len(rep.abandoned):>11}{rep.errors:>8}"
          f"{percentile(rep.accepted_latency_s, 50) * 1e3:>8.0f}{percentile(rep.accepted_latency_s, 99) * 1e3:>8.0f}"
          f"{r.spans_acked / r.wall_s:>9,.0f}")
    print(f"  statuses {dict(rep.statuses)}; accepted attempt latency p50/p99 "
          f"{percentile(rep.accepted_latency_s, 50) * 1e3:.0f}/{percentile(rep.accepted_latency_s, 99) * 1e3:.0f} ms; "
          f"rejected answered in p50/p99 {percentile(rep.rejected_latency_s, 50) * 1e3:.1f}/"
          f"{percentile(rep.rejected_latency_s, 99) * 1e3:.1f} ms; per body with retries p50/p99 "
          f"{percentile(e2e, 50) * 1e3:.0f}/{percentile(e2e, 99) * 1e3:.0f} ms; "
          f"server CPU {r.server_cpu_s:.1f} s ({r.spans_acked / max(r.server_cpu_s, 1e-9):,.0f} spans/CPU-s)")
    if rep.error_samples:
        print(f"  client errors: {rep.error_samples}")
    c = r.check
    print(f"  dataset: {c.rows:,} rows; acknowledged {c.acknowledged:,}: missing {c.missing}, duplicated "
          f"{c.duplicated}, rows never acknowledged {c.unacknowledged_rows}")
    backpressure = r.rejected_with_retry > 0
    print(f"{verdict(c.exact and backpressure)}: load test, {r.connections} clients: zero acknowledged spans lost "
          f"({'yes' if c.exact else 'NO'}); backpressure answered with Retry-After "
          f"({r.rejected_with_retry:,} times{'' if backpressure else ': never triggered, lower --queue-bytes'})")


def print_crash(results: Sequence[CrashResult]) -> None:
    print(f"{'target':<24}{'acked before kill':>19}{'in flight':>11}{'resent':>9}{'missing':>9}{'lost':>7}"
          f"{'duplicated':>12}{'restart s':>11}")
    for r in results:
        name = "tracelearn sidecar" if r.target == "tracelearn" else "agl store (memory)"
        print(f"{name:<24}{r.spans_acked_before_kill:>19,}{r.bodies_unanswered_at_kill:>11}"
              f"{r.spans_resent_after_restart:>9,}{r.spans_missing:>9,}{r.lost_share:>7.0%}{r.spans_duplicated:>12}"
              f"{r.restart_s:>11.1f}")
        for note in r.notes:
            print(f"  {r.target}: {note}")
    for r in results:
        if r.target == "tracelearn":
            ok = r.spans_missing == 0 and r.spans_duplicated == 0
            print(f"{verdict(ok)}: after kill -9 and restart, {r.spans_missing} of {r.spans_acked_before_kill:,} "
                  f"acknowledged spans missing, {r.spans_duplicated} duplicated (resent bodies included)")


PARTS = ("ingest", "compare", "load", "crash")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="short run of every selected part")
    parser.add_argument("--spans", type=int, help="spans per ingest run (default 150000; --quick 30000)")
    parser.add_argument("--batch", type=int, default=512, help="spans per request (default 512)")
    parser.add_argument("--mix", nargs="+", choices=MIXES,
                        help="span mixes of the ingest part (default: both; --quick: llm); the first one also drives "
                             "compare, load and crash")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connections for ingest/compare/crash, "
                        "one client process each (default 4)")
    parser.add_argument("--load-connections", type=int, default=64)
    parser.add_argument("--load-processes", type=int, default=4, help="client processes of the load test")
    parser.add_argument("--load-seconds", type=float, help="load test duration (default 30; --quick 8)")
    parser.add_argument("--queue-bytes", type=int, default=8 * 2**20,
                        help="the sidecar's --queue-bytes in the load test (default 8 MiB: ~4 bodies of the llm mix)")
    parser.add_argument("--crash-spans", type=int, help="spans of the crash run (default 60000; --quick 15000)")
    parser.add_argument("--agl", type=Path, default=DEFAULT_AGL, help="the agl command (benchmarks/.venv-agl)")
    parser.add_argument("--workdir", type=Path, help="keep servers' data and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    mixes: list[Mix] = args.mix or (["llm"] if args.quick else list(MIXES))
    spans = args.spans or (30_000 if args.quick else 150_000)
    load_seconds = args.load_seconds or (8.0 if args.quick else 30.0)
    crash_spans = args.crash_spans or (15_000 if args.quick else 60_000)
    have_agl = args.agl.exists()
    if not have_agl and ("compare" in args.parts or "crash" in args.parts):
        print(f"note: {args.agl} not found (bash benchmarks/setup_agentlightning.sh): agl runs skipped")

    started = time.perf_counter()
    workloads = {mix: build_workload(spans, args.batch, mix=mix) for mix in mixes}
    workload = workloads[mixes[0]]
    for mix, each in workloads.items():
        print(f"workload {mix}: {each.bodies} unique bodies of {args.batch} spans ({each.spans:,} spans, "
              f"{each.traces} rollouts in {len(each.templates)} templates), {each.bytes_per_span:,.0f} B/span OTLP "
              f"protobuf, {each.bytes_per_span * args.batch / 2**20:.2f} MiB/body")
    print(f"built in {time.perf_counter() - started:.1f} s; machine: {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    gauges = {mix: decode_rows_rate(each) for mix, each in workloads.items()}
    for mix, gauge in gauges.items():
        print(f"gauge, {mix} mix: the sidecar's decode + rows alone, in this process: {gauge:,.0f} spans/CPU-s "
              f"(its ceiling before HTTP, spool and Parquet; varies with the machine's state)")

    def sub(name: str) -> Path | None:
        return args.workdir / name if args.workdir else None

    if "ingest" in args.parts or ("compare" in args.parts and have_agl):
        for index, (mix, each) in enumerate(workloads.items()):
            compare = index == 0 and "compare" in args.parts and have_agl
            if not compare and "ingest" not in args.parts:
                continue
            print(f"\n== ingest, {mix} mix: durable OTLP/HTTP protobuf, spans per server CPU-second ==")
            if compare:
                comparison = compare_with_agl(spans, args.clients, args.batch, sub(f"compare-{mix}"), args.agl, each)
                results = [comparison.ours, comparison.agl]
            else:
                results = [measure_ingest("tracelearn", each, args.clients, sub(f"ingest-{mix}"))]
            print_ingest_table(results)
            for result in results:
                print(f"{result.target}:")
                print_ingest_details(result)
            print_ingest_verdict(results[0], gauges[mix])
            if compare:
                print(f"\n== compare, {mix} mix: the same bodies against agl store ==")
                print_comparison(comparison)

    if "load" in args.parts:
        print(f"\n== load: {args.load_connections} clients for {load_seconds:.0f} s, write queue "
              f"{args.queue_bytes / 2**20:.0f} MiB, Retry-After honoured ==")
        print_load(load_test(args.load_connections, load_seconds, args.queue_bytes, args.load_processes, args.batch,
                             sub("load"), workload.with_bodies(0)))

    if "crash" in args.parts:
        print(f"\n== crash: SIGKILL at 50% of {crash_spans:,} spans acknowledged, restart, resend the rest ==")
        targets: list[Target] = ["tracelearn", "agl"] if have_agl else ["tracelearn"]
        print_crash([crash_durability(t, crash_spans, args.clients, 0.5, args.batch,
                                      sub(f"crash-{t}"), args.agl, workload) for t in targets])
    print(f"\ngauge at the end, {mixes[0]} mix: decode + rows alone {decode_rows_rate(workload):,.0f} spans/CPU-s; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
