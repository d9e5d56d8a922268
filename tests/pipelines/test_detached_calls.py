"""One call seen by two instrumentations in two traces (OpenInference's LangChain spans keep their own
context, so Traceloop's ``openai.chat`` starts a trace of its own): counted once, in the agent's rollout."""

import json
from pathlib import Path
from typing import Any

import polars as pl
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.schemas import semconv as sc

QUESTION = [{"role": "user", "parts": [{"type": "text", "content": "What is 12 times 34?"}]}]
TOOL_CALL = [
    {
        "role": "assistant",
        "parts": [{"type": "tool_call", "id": "c1", "name": "calculator", "arguments": {"expression": "12 * 34"}}],
    }
]
OPENINFERENCE_SCOPE = "openinference.instrumentation.langchain"


def where(thread: int) -> dict[str, Any]:
    return {sc.PROCESS_PID: 4242, sc.THREAD_ID: thread}


def write_run(factory: SpansFactory, trace: int, start: float, client_thread: int = 1) -> None:
    """An OpenInference LangGraph run (graph, node, LLM span without response id or token ids) and the
    client's own span of the same call in a trace of its own, with the response id and token ids."""
    graph = factory.span(
        trace, "calculator_agent", start, start + 10, attributes={"openinference.span.kind": "CHAIN", **where(1)}
    )
    node = factory.span(trace, "model", start + 1, start + 5, parent=graph, attributes=where(1))
    framework = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_REQUEST_MODEL: "scripted",
        sc.GEN_AI_INPUT_MESSAGES: json.dumps(QUESTION),
        sc.GEN_AI_OUTPUT_MESSAGES: json.dumps(TOOL_CALL),
        **where(1),
    }
    factory.span(trace, "ChatOpenAI", start + 1.1, start + 4.9, parent=node, attributes=framework)
    spaced = json.dumps(TOOL_CALL).replace('"12 * 34"', '"12 * 34" ')  # the wire's own spacing
    client = {
        **framework,
        sc.GEN_AI_OUTPUT_MESSAGES: spaced,
        sc.GEN_AI_RESPONSE_ID: f"chatcmpl-{trace}",
        sc.GEN_AI_RESPONSE_FINISH_REASONS: ["tool_calls"],
        sc.GEN_AI_USAGE_INPUT_TOKENS: 12,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: 5,
        sc.PROMPT_TOKEN_IDS: [1, 2],
        sc.RESPONSE_TOKEN_IDS: [3],
        sc.RESPONSE_LOGPROBS: [-0.1],
        sc.TOKEN_IDS_STATUS: "server",
        **where(client_thread),
    }
    factory.span(trace + 100, "openai.chat", start + 1.2, start + 4.8, attributes=client)


def test_a_call_recorded_in_a_trace_of_its_own_joins_the_span_it_ran_inside(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    write_run(factory, 1, 0)
    write_run(factory, 2, 20)
    factory.write()
    stats = spans_stats(tmp_path / "data")
    assert (stats.traces, stats.rollouts, stats.llm_calls) == (4, 2, 2)
    assert stats.rollouts_by_identity == {"trace": 2}
    built = build_transitions(tmp_path / "data", tmp_path / "out", now=at(3600))
    assert built.summary["rollouts"] == 2 and built.summary["transitions"] == 2
    transitions = pl.read_parquet(built.transitions_files).sort("rollout_id").to_dicts()
    assert [t["rollout_id"] for t in transitions] == [format(1, "032x"), format(2, "032x")]
    assert all(t["response_token_ids"] == [3] and t["token_ids_source"] == "server" for t in transitions)
    rollouts = pl.read_parquet(built.rollouts_files)
    assert rollouts.get_column("input_tokens").to_list() == [12, 12], "the call's tokens count once"


def test_a_loose_call_in_another_thread_is_not_taken_for_the_span_around_it(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    write_run(factory, 1, 0, client_thread=2)
    factory.write()
    stats = spans_stats(tmp_path / "data")
    assert (stats.rollouts, stats.llm_calls) == (2, 2)
