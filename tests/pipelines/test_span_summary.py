"""``spans stats`` counts what a build would: rollouts as joined, each LLM call once, unknown spans by scope.

It also says what still waits in the spool (not rolled into Parquet yet).
"""

import json
from pathlib import Path

import polars as pl
from support.capture import installed_capture
from support.spans_factory import SpansFactory, at

import tracelearn
from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.schemas import semconv as sc

SYSTEM = {"role": "system", "parts": [{"type": "text", "content": "Answer."}]}
QUESTION = {"role": "user", "parts": [{"type": "text", "content": "What is 2 plus 2?"}]}
ANSWER = {"role": "assistant", "parts": [{"type": "text", "content": "4"}]}


def test_stats_report_spooled_rollouts_until_their_files_roll(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_SECONDS=3600):
        with tracelearn.rollout(task_id="t-1"):
            tracelearn.emit_reward(1.0)
        during = spans_stats(tmp_path)
    after = spans_stats(tmp_path)
    assert during.spool_segments == 1 and during.spool_bytes > 0 and during.rollouts == 0
    assert after.spool_segments == 0 and after.rollouts == 1 and after.rollouts_with_reward == 1
    assert after.rollouts_by_identity == {"explicit": 1}


def write_nested_call(data: Path) -> None:
    """Traceloop's openai-agents shape: an agent span, an ``openai.response`` span with the input only,
    and inside it the complete ``openai.chat`` span (output, usage, finish reason, token ids)."""
    factory = SpansFactory(data / "spans")
    agent = factory.span(1, "Assistant.agent", 0, 10, attributes={sc.GEN_AI_OPERATION_NAME: "invoke_agent"})
    outer = factory.span(
        1,
        "openai.response",
        1,
        5,
        parent=agent,
        attributes={
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_REQUEST_MODEL: "smollm2",
            sc.GEN_AI_INPUT_MESSAGES: json.dumps([SYSTEM, QUESTION]),
            sc.GEN_AI_USAGE_INPUT_TOKENS: 7,
        },
    )
    inner = factory.span(
        1,
        "openai.chat",
        1.1,
        4.9,
        parent=outer,
        attributes={
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_REQUEST_MODEL: "smollm2",
            sc.GEN_AI_RESPONSE_ID: "chatcmpl-1",
            sc.GEN_AI_INPUT_MESSAGES: json.dumps([SYSTEM, QUESTION]),
            sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([ANSWER]),
            sc.GEN_AI_RESPONSE_FINISH_REASONS: ["stop"],
            sc.GEN_AI_USAGE_INPUT_TOKENS: 7,
            sc.GEN_AI_USAGE_OUTPUT_TOKENS: 1,
            sc.PROMPT_TOKEN_IDS: [1, 2, 3],
            sc.RESPONSE_TOKEN_IDS: [4],
            sc.RESPONSE_LOGPROBS: [-0.5],
            sc.TOKEN_IDS_STATUS: "server",
        },
    )
    factory.span(1, "POST", 1.2, 4.8, parent=inner, attributes={"http.request.method": "POST"})
    factory.span(1, "mystery", 6, 7, parent=agent, attributes={"vendor.thing": 1})
    factory.write()


def test_nested_llm_spans_count_once_everywhere(tmp_path: Path) -> None:
    write_nested_call(tmp_path / "data")
    stats = spans_stats(tmp_path / "data")
    assert stats.spans == 5 and stats.llm_calls == 1
    assert (stats.input_tokens, stats.output_tokens) == (7, 1), "tokens of both spans count once"
    assert stats.token_ids_status == {"server": 1} and stats.by_agent_model[0].with_token_ids == 1
    assert stats.other_spans_by_scope == {"tests.spans_factory": 2}, "the HTTP span and the unknown one"
    built = build_transitions(tmp_path / "data", tmp_path / "out", now=at(3600))
    (rollout,) = pl.read_parquet(built.rollouts_files).to_dicts()
    assert (rollout["n_llm_calls"], rollout["input_tokens"], rollout["output_tokens"]) == (1, 7, 1)
    assert rollout["n_spans"] == 4 and rollout["status"] == "ok", "the HTTP span now hangs under the merged call"
    (transition,) = pl.read_parquet(built.transitions_files).to_dicts()
    assert json.loads(transition["response"]) == [{"role": "assistant", "content": "4"}]
    assert transition["response_token_ids"] == [4] and transition["token_ids_source"] == "server"
    assert transition["span_id"] == format(2, "016x"), "the outer span is the call (its place in the tree)"


def test_loose_calls_count_as_the_rollouts_a_build_makes(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    asked = [SYSTEM, QUESTION]
    call = {
        "role": "assistant",
        "parts": [{"type": "tool_call", "id": "c1", "name": "calc", "arguments": {"e": "2+2"}}],
    }
    result = {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "4"}]}
    for trace, (inputs, output) in enumerate([(asked, call), ([*asked, call, result], ANSWER)], start=1):
        attributes = {
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_INPUT_MESSAGES: json.dumps(inputs),
            sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([output]),
        }
        factory.span(trace, "openai.chat", trace, trace + 0.5, attributes=attributes)
    factory.write()
    stats = spans_stats(tmp_path / "data")
    assert (stats.traces, stats.rollouts, stats.tasks, stats.llm_calls) == (2, 1, 1, 2)
    assert stats.rollouts_by_identity == {"conversation": 1}
