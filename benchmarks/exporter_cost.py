"""Exporter cost per span: our Parquet path against OTel's OTLP protobuf encoder, same spans, same run.

Target (issue): the Parquet path costs at most half of what OTLP protobuf encoding costs per span,
i.e. ``otlp_encode / tracelearn_parquet >= 2``.

The spans are real SDK ``ReadableSpan``s (``TracerProvider`` + ``SimpleSpanProcessor`` into an
``InMemorySpanExporter``) shaped like an agent's: per rollout one workflow root span, several
``openai.chat`` LLM spans in Traceloop 0.62's form (``gen_ai.input.messages`` /
``gen_ai.output.messages`` JSON with parts, a growing conversation, tool definitions, usage, models,
response id, finish reasons; ~3 KB each), on a share of them (``--token-id-share``) token ids and
logprobs as int/float sequences (``tracelearn.llm.*``), tool spans (GenAI ``execute_tool`` and
Traceloop ``*.tool``) and a reward span, all stamped with rollout identity as ``RolloutContextSpanProcessor`` does.

Each round times, in the same process and on the same spans, in batches of ``--batch`` spans (what
``DurableBatchSpanProcessor`` hands an exporter):

* ours: a fresh ``ParquetSpanExporter`` (temp directory) ``export(batch)`` and ``force_flush()`` per
  batch, then ``shutdown()``: conversion to columns, Arrow, the spool append (Arrow IPC, fsync), and
  the Parquet (zstd) write from memory with fsync and rename (at the size roll and at shutdown),
  i.e. everything a span costs on its way to the dataset;
* OTLP: ``encode_spans(batch).SerializeToString()`` per batch, encoding only (no HTTP send).

Wall time (``perf_counter``) and process CPU time (``process_time``) are both reported; the ratio
uses medians over the rounds. Nothing is asserted: the script prints PASS or BELOW TARGET, once per
span mix (by default two: token ids on 50% of LLM spans, and on none; OTLP pays dearly for long
integer arrays, one ``AnyValue`` per element, so the second mix is the harder one for us).

    .venv/bin/python benchmarks/exporter_cost.py [--spans 20000] [--rounds 5] [--batch 2048] [--token-id-share 0.5 0.0]
    .venv/bin/python benchmarks/exporter_cost.py --profile ours   # cProfile of our path, top entries
"""

import argparse
import cProfile
import gc
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context

from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_exporter import ParquetSpanExporter
from tracelearn.schemas import semconv as sc

TARGET_RATIO = 2.0
MODEL = "SmolLM2-135M-Instruct"
WORDS = (
    *("the", "a", "tool", "result", "value", "check", "compute", "answer", "step", "plan", "search", "file"),
    *("table", "user", "number", "list", "agent", "first", "then", "next", "because", "therefore", "sum"),
    *("total", "price", "order", "city", "weather", "report"),
)
TOOLS = ("calculator", "web_search", "read_file", "sql_query")
TOOL_DEFINITIONS = json.dumps(
    [
        {
            "type": "function",
            "name": name,
            "description": f"Use {name} to look something up or compute a value for the user.",
            "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]},
        }
        for name in TOOLS
    ]
)
SYSTEM_PROMPT = (
    "You are a careful assistant that solves the user's task step by step. Use the tools when a fact or a "
    "computation is needed, check every tool result, and finish with a short final answer. " * 2
)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _llm_attributes(rng: random.Random, turn: int, history: list[dict[str, Any]], with_ids: bool) -> dict[str, Any]:
    """One Traceloop 0.62 ``openai.chat`` span's attributes for conversation turn ``turn``."""
    input_messages = [{"role": "system", "parts": [{"content": SYSTEM_PROMPT, "type": "text"}]}, *history]
    calls_tool = turn < 3
    parts: list[dict[str, Any]] = [{"content": _text(rng, 40 if calls_tool else 90), "type": "text"}]
    if calls_tool:
        parts.append(
            {
                "type": "tool_call",
                "name": TOOLS[turn % len(TOOLS)],
                "id": f"call_{rng.getrandbits(64):016x}",
                "arguments": {"input": _text(rng, 8)},
            }
        )
    output = [{"role": "assistant", "parts": parts, "finish_reason": "tool_call" if calls_tool else "stop"}]
    input_tokens = len(json.dumps(input_messages)) // 4
    output_tokens = len(json.dumps(output)) // 4
    attributes: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: "openai",
        sc.GEN_AI_REQUEST_MODEL: MODEL,
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.max_tokens": 512,
        "gen_ai.is_streaming": False,
        "gen_ai.openai.api_base": "http://127.0.0.1:8000/v1/",
        sc.GEN_AI_INPUT_MESSAGES: json.dumps(input_messages),
        "gen_ai.tool.definitions": TOOL_DEFINITIONS,
        sc.GEN_AI_RESPONSE_MODEL: MODEL,
        sc.GEN_AI_RESPONSE_ID: f"chatcmpl-{rng.getrandbits(96):024x}",
        sc.GEN_AI_RESPONSE_FINISH_REASONS: ("tool_calls" if calls_tool else "stop",),
        "gen_ai.usage.total_tokens": input_tokens + output_tokens,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
        sc.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        sc.GEN_AI_OUTPUT_MESSAGES: json.dumps(output),
        "llm.headers": "None",
    }
    if with_ids:
        attributes[sc.PROMPT_TOKEN_IDS] = [rng.randrange(49152) for _ in range(input_tokens)]
        attributes[sc.RESPONSE_TOKEN_IDS] = [rng.randrange(49152) for _ in range(output_tokens)]
        attributes[sc.RESPONSE_LOGPROBS] = [-rng.expovariate(3.0) for _ in range(output_tokens)]
        attributes[sc.TOKEN_IDS_STATUS] = sc.TOKEN_IDS_FROM_SERVER
    else:
        attributes[sc.TOKEN_IDS_STATUS] = sc.TOKEN_IDS_NOT_REQUESTED
    # The next call's prompt carries this answer (and the tool's result): the conversation grows.
    history.append({"role": "assistant", "parts": parts})
    if calls_tool:
        history.append(
            {
                "role": "tool",
                "parts": [{"type": "tool_call_response", "id": parts[1]["id"], "response": _text(rng, 30)}],
            }
        )
    return attributes


def _rollout(tracer: Tracer, rng: random.Random, index: int, llm_calls: int, token_id_share: float) -> None:
    rollout_id = f"ro-{index:08d}"
    identity = {
        sc.ROLLOUT_ID: rollout_id,
        sc.ATTEMPT_ID: f"{rollout_id}-a0",
        sc.TASK_ID: f"task-{index % 64:04d}",
        sc.AGENT_NAME: "math_agent",
    }
    with tracer.start_as_current_span(
        "math_agent.workflow",
        attributes={**identity, sc.TRACELOOP_SPAN_KIND: "workflow", sc.TRACELOOP_ENTITY_NAME: "math_agent"},
    ) as root:
        ctx = set_span_in_context(root)
        history: list[dict[str, Any]] = [
            {"role": "user", "parts": [{"content": _text(rng, 60), "type": "text"}]},
        ]
        for turn in range(llm_calls):
            with_ids = rng.random() < token_id_share
            attributes = {**identity, sc.AGENT_INHERITED: "math_agent"}
            attributes.update(_llm_attributes(rng, turn, history, with_ids))
            with tracer.start_as_current_span("openai.chat", context=ctx, kind=SpanKind.CLIENT, attributes=attributes):
                pass
            if turn < llm_calls - 1:
                tool = TOOLS[turn % len(TOOLS)]
                if turn % 2 == 0:
                    tool_attributes: dict[str, Any] = {
                        sc.GEN_AI_OPERATION_NAME: "execute_tool",
                        sc.GEN_AI_TOOL_NAME: tool,
                        "gen_ai.tool.call.id": f"call_{rng.getrandbits(64):016x}",
                        "gen_ai.tool.call.arguments": json.dumps({"input": _text(rng, 8)}),
                        "gen_ai.tool.call.result": _text(rng, 30),
                    }
                    name = f"execute_tool {tool}"
                else:
                    tool_attributes = {
                        sc.TRACELOOP_SPAN_KIND: "tool",
                        sc.TRACELOOP_ENTITY_NAME: tool,
                        "traceloop.entity.input": json.dumps({"inputs": {"input": _text(rng, 8)}}),
                        "traceloop.entity.output": json.dumps({"outputs": _text(rng, 30)}),
                    }
                    name = f"{tool}.tool"
                with tracer.start_as_current_span(
                    name, context=ctx, attributes={**identity, sc.AGENT_INHERITED: "math_agent", **tool_attributes}
                ) as tool_span:
                    if turn == 1 and index % 10 == 0:
                        tool_span.set_status(Status(StatusCode.ERROR, "tool timed out"))
        with tracer.start_as_current_span(
            sc.SPAN_REWARD,
            context=ctx,
            attributes={
                **identity,
                sc.SPAN_TYPE: sc.TYPE_REWARD,
                sc.REWARD_NAME: "correct",
                sc.REWARD_VALUE: float(rng.random() < 0.5),
                sc.REWARD_PRIMARY: True,
            },
        ):
            pass


def build_spans(count: int, token_id_share: float = 0.5, seed: int = 0) -> list[ReadableSpan]:
    """``count`` ended SDK spans from whole rollouts (root, LLM, tool and reward spans)."""
    rng = random.Random(seed)
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "math-agent", "deployment.environment": "bench"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai.v1", "0.62.4")
    index = 0
    while len(memory.get_finished_spans()) < count:
        _rollout(tracer, rng, index, llm_calls=4 + index % 3, token_id_share=token_id_share)
        index += 1
    spans = list(memory.get_finished_spans()[:count])
    provider.shutdown()
    return spans


def describe(spans: Sequence[ReadableSpan]) -> str:
    llm = [s for s in spans if s.name == "openai.chat"]
    with_ids = [s for s in llm if s.attributes and sc.PROMPT_TOKEN_IDS in s.attributes]
    otlp_bytes = len(encode_spans(spans[:2048]).SerializeToString()) / min(len(spans), 2048)
    message_bytes = statistics.mean(
        len(str(s.attributes.get(sc.GEN_AI_INPUT_MESSAGES, "")))
        + len(str(s.attributes.get(sc.GEN_AI_OUTPUT_MESSAGES, "")))
        for s in llm
        if s.attributes
    )
    prompt_ids = statistics.mean([len(s.attributes[sc.PROMPT_TOKEN_IDS]) for s in with_ids if s.attributes] or [0])
    return (
        f"{len(spans)} spans: {len(llm)} LLM ({len(with_ids)} with token ids, mean {prompt_ids:.0f} prompt ids), "
        f"{len(spans) - len(llm)} root/tool/reward; LLM messages {message_bytes / 1024:.1f} KB/span mean; "
        f"OTLP size {otlp_bytes / 1024:.2f} KB/span"
    )


def batches(spans: Sequence[ReadableSpan], size: int) -> list[Sequence[ReadableSpan]]:
    return [spans[i : i + size] for i in range(0, len(spans), size)]


def run_ours(spans_batches: Sequence[Sequence[ReadableSpan]], directory: Path) -> int:
    exporter = ParquetSpanExporter(CaptureSettings.from_env({"TRACELEARN_DATA": str(directory)}))
    for batch in spans_batches:
        exporter.export(batch)
        exporter.force_flush()  # into the spool: a batch this size holds many rollout ends
    exporter.shutdown()  # into Parquet what has not rolled by size yet
    return exporter.writer.rows_written


def run_otlp(spans_batches: Sequence[Sequence[ReadableSpan]]) -> int:
    size = 0
    for batch in spans_batches:
        size += len(encode_spans(batch).SerializeToString())
    return size


@dataclass
class Timing:
    wall: float
    cpu: float


def timed(action: Callable[[], object]) -> Timing:
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def profile_ours(spans_batches: Sequence[Sequence[ReadableSpan]], top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tracelearn-bench-") as tmp:
        profiler = cProfile.Profile()
        profiler.enable()
        run_ours(spans_batches, Path(tmp))
        profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


@dataclass
class Result:
    """Median cost per span of both paths for one span mix."""

    token_id_share: float
    ours_wall: float
    ours_cpu: float
    otlp_wall: float
    otlp_cpu: float

    @property
    def ratio(self) -> float:
        return self.otlp_wall / self.ours_wall

    @property
    def cpu_ratio(self) -> float:
        return self.otlp_cpu / self.ours_cpu


def measure(spans_batches: Sequence[Sequence[ReadableSpan]], spans: int, rounds: int, share: float) -> Result:
    """Time both paths ``rounds`` times each, alternating which goes first."""
    ours: list[Timing] = []
    otlp: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="tracelearn-bench-") as tmp:
        # Warm-up (imports, first file in a directory, allocator), not counted.
        run_ours(spans_batches[:1], Path(tmp) / "warmup")
        run_otlp(spans_batches[:1])
        for round_index in range(rounds):
            directory = Path(tmp) / f"round-{round_index}"
            steps: list[tuple[list[Timing], Callable[[], object]]] = [
                (ours, lambda directory=directory: run_ours(spans_batches, directory)),  # type: ignore[misc]
                (otlp, lambda: run_otlp(spans_batches)),
            ]
            # Alternate which path goes first so neither always runs on a warmer or cooler machine.
            for results, action in steps if round_index % 2 == 0 else reversed(steps):
                results.append(timed(action))
            print(
                f"  round {round_index + 1}/{rounds}: tracelearn parquet {ours[-1].wall * 1e6 / spans:7.1f} us/span, "
                f"otlp encode {otlp[-1].wall * 1e6 / spans:7.1f} us/span"
            )
        rows = pq.read_table(Path(tmp) / "round-0").num_rows
    if rows != spans:  # correctness of what was timed, not a timing check
        raise SystemExit(f"the Parquet path wrote {rows} rows for {spans} spans")

    def per_span(values: list[float]) -> float:
        return statistics.median(values) * 1e6 / spans

    return Result(
        share,
        per_span([t.wall for t in ours]),
        per_span([t.cpu for t in ours]),
        per_span([t.wall for t in otlp]),
        per_span([t.cpu for t in otlp]),
    )


def report(result: Result, rounds: int) -> None:
    print(f"{'path':<44}{'wall us/span':>14}{'cpu us/span':>14}{'spans/s':>12}")
    for label, wall, cpu in (
        ("tracelearn parquet (convert+spool+write)", result.ours_wall, result.ours_cpu),
        ("otlp protobuf encode (no send)", result.otlp_wall, result.otlp_cpu),
    ):
        print(f"{label:<44}{wall:>14.1f}{cpu:>14.1f}{1e6 / wall:>12,.0f}")
    verdict = "PASS" if result.ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"ratio otlp_encode / tracelearn_parquet = {result.ratio:.2f}x wall, {result.cpu_ratio:.2f}x cpu")
    print(f"{verdict}: target >= {TARGET_RATIO:.1f}x (wall, median of {rounds} rounds)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=20_000, help="spans per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path (default 5)")
    parser.add_argument("--batch", type=int, default=2048, help="spans per export call (default 2048)")
    parser.add_argument(
        "--token-id-share",
        type=float,
        nargs="+",
        default=[0.5, 0.0],
        help="fraction(s) of LLM spans carrying token ids and logprobs, one span mix each (default 0.5 0.0)",
    )
    parser.add_argument("--profile", choices=("ours",), help="profile one run of our path instead of timing")
    args = parser.parse_args(argv)

    results = []
    for share in args.token_id_share:
        started = time.perf_counter()
        spans = build_spans(args.spans, share)
        print(f"\n== token ids on {share:.0%} of LLM spans ==")
        print(f"built {describe(spans)} in {time.perf_counter() - started:.1f} s")
        spans_batches = batches(spans, args.batch)
        if args.profile:
            profile_ours(spans_batches, top=30)
            continue
        results.append(measure(spans_batches, args.spans, args.rounds, share))
        report(results[-1], args.rounds)
        del spans, spans_batches
    if len(results) > 1:
        print(
            "\nsummary (wall, median): "
            + "; ".join(
                f"token ids on {r.token_id_share:.0%} of LLM spans: {r.ours_wall:.1f} vs {r.otlp_wall:.1f} us/span, "
                f"{r.ratio:.2f}x {'PASS' if r.ratio >= TARGET_RATIO else 'BELOW TARGET'}"
                for r in results
            )
        )


if __name__ == "__main__":
    main()
