"""The collector ingest benchmark's workload: OTLP request bodies of real SDK spans, every one unique.

Template requests are whole rollouts of SDK spans (``llm``: ``llm_call_spans``; ``rollouts``:
``exporter_cost.build_spans``) encoded once by the SDK's OTLP encoder; ``BodyMaker`` makes body ``k``
from template ``k % T`` by rewriting ids and rollout attributes in place, never re-encoding a span.
``decode_rows_rate`` is the gauge: the sidecar's decode + rows alone, in this process.
Part of ``collector_ingest.py`` (see its docstring).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, set_span_in_context

from tracelearn.schemas import semconv as sc

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules; spawned client processes re-import them
    sys.path.insert(0, str(HERE))

from exporter_cost import WORDS, build_spans  # noqa: E402

AGL_ROLLOUT_ID = "agentlightning.rollout_id"
AGL_ATTEMPT_ID = "agentlightning.attempt_id"
Mix = Literal["llm", "rollouts"]
MIXES: tuple[Mix, ...] = ("llm", "rollouts")



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

