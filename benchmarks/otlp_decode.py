"""OTLP decode throughput: spans per CPU-second for protobuf and OTLP/JSON request bodies.

One request of 500 realistic LLM spans (gen_ai attributes, ~2 KB prompt and ~1 KB completion as
GenAI-conventions message JSON, token ids absent, ~3 KB per span encoded) made with the real SDK and
encoded with its own OTLP encoder. Reports decode alone, and decode plus ``SpanColumns`` rows
(message normalization, Arrow batches) which is what the receiver pays before writing. The ratio
printed is against the receiver's goal of 20,000 spans per CPU-second.

    .venv/bin/python benchmarks/otlp_decode.py [--spans 500] [--repeat 20]
"""

import argparse
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tracelearn.collector.otlp_decode import DecodedSpans, decode_json, decode_protobuf
from tracelearn.collector.span_rows import SpanColumns

GOAL_SPANS_PER_CPU_SECOND = 20_000
ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId"})


def llm_spans(count: int) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench-agent", "deployment.environment": "bench", "host.name": "h1"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai", "0.62.4")
    prompt = "Solve the following problem step by step and explain each step carefully. " * 27  # ~2 KB
    completion = "First we note that the quantity is bounded, so we can proceed as follows. " * 14  # ~1 KB
    with tracer.start_as_current_span("rollout", attributes={"tracelearn.span.type": "rollout"}):
        for index in range(count - 1):
            with tracer.start_as_current_span("openai.chat", kind=SpanKind.CLIENT) as span:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.provider.name": "openai",
                        "gen_ai.request.model": "gpt-4o-mini",
                        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                        "gen_ai.response.id": f"chatcmpl-{index:020d}",
                        "gen_ai.response.finish_reasons": ("stop",),
                        "gen_ai.request.temperature": 0.7,
                        "gen_ai.request.max_tokens": 512,
                        "gen_ai.usage.input_tokens": 512,
                        "gen_ai.usage.output_tokens": 230,
                        "gen_ai.usage.total_tokens": 742,
                        "gen_ai.input.messages": json.dumps(
                            [
                                {"role": "system", "parts": [{"type": "text", "content": "You are a careful solver."}]},
                                {"role": "user", "parts": [{"type": "text", "content": f"{index}: {prompt}"}]},
                            ]
                        ),
                        "gen_ai.output.messages": json.dumps(
                            [
                                {
                                    "role": "assistant",
                                    "parts": [{"type": "text", "content": completion}],
                                    "finish_reason": "stop",
                                }
                            ]
                        ),
                        "llm.is_streaming": False,
                        "tracelearn.rollout.id": "r-1",
                        "tracelearn.task.id": "t-1",
                        "server.address": "api.openai.com",
                    }
                )
    provider.shutdown()
    return list(memory.get_finished_spans())


def otlp_json_body(spans: list[ReadableSpan]) -> bytes:
    def hex_ids(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: base64.b64decode(v).hex() if k in ID_FIELDS else hex_ids(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hex_ids(v) for v in value]
        return value

    return orjson.dumps(hex_ids(MessageToDict(encode_spans(spans))))


def cpu_rate(work: Callable[[], int], repeat: int) -> float:
    """Spans per CPU-second of ``work`` (which returns the spans it handled), best of ``repeat`` runs."""
    best = float("inf")
    handled = 0
    for _ in range(repeat):
        start = time.process_time()
        handled = work()
        best = min(best, time.process_time() - start)
    return handled / best


def with_rows(decode: Callable[[bytes], DecodedSpans], body: bytes) -> Callable[[], int]:
    def work() -> int:
        decoded = decode(body)
        columns = SpanColumns()
        columns.add_all(decoded.records)
        columns.take()
        return len(decoded.records)

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    spans = llm_spans(args.spans)
    bodies = {
        "protobuf": (decode_protobuf, encode_spans(spans).SerializeToString()),
        "json": (decode_json, otlp_json_body(spans)),
    }
    for name, (decode, body) in bodies.items():
        decoded = decode(body)
        assert len(decoded.records) == len(spans) and not decoded.rejected_spans, decoded.error_message
        decode_only = cpu_rate(lambda decode=decode, body=body: len(decode(body).records), args.repeat)
        rows = cpu_rate(with_rows(decode, body), args.repeat)
        print(
            f"{name:8s} request {len(body) / 1024:7.0f} KiB, {len(body) / len(spans):5.0f} B/span: "
            f"decode {decode_only:9,.0f} spans/CPU-s ({decode_only / GOAL_SPANS_PER_CPU_SECOND:5.1f}x goal), "
            f"decode+rows {rows:8,.0f} spans/CPU-s ({rows / GOAL_SPANS_PER_CPU_SECOND:4.2f}x goal)"
        )


if __name__ == "__main__":
    main()
