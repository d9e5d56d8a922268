"""Rollouts rebuilt without a root span: each rule of ``tracelearn.pipelines.rollout_identity``.

Every call here is its own trace with no span of the agent's around it, as the plain OpenAI SDK,
the Agents SDK without its instrumentor, smolagents or uninstrumented Pydantic AI leave them; the
spans go through the real capture path (``SpanColumns`` normalizes the GenAI message attributes).
"""

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.pipelines.prepared import prepare_spans
from tracelearn.pipelines.rollout_identity import JoinConfig, decode_messages
from tracelearn.pipelines.rollouts import RolloutConfig, build_closed_rollouts, build_rollouts
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.identity import task_id_from_messages

SYSTEM = "Solve the arithmetic. Use the calculator tool."
LATER = at(3600)


def text(role: str, content: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": content}]}


def tool_call(call_id: str, expression: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "parts": [{"type": "tool_call", "id": call_id, "name": "calculator", "arguments": {"expression": expression}}],
    }


def tool_result(call_id: str, result: str) -> dict[str, Any]:
    return {"role": "tool", "parts": [{"type": "tool_call_response", "id": call_id, "response": result}]}


def call(
    factory: SpansFactory,
    trace: int,
    start: float,
    inputs: list[dict[str, Any]],
    output: dict[str, Any],
    thread: int = 1,
    pid: int = 4242,
    end: float | None = None,
    parent: int | None = None,
    status: str = "UNSET",
    rollout_id: str | None = None,
) -> int:
    """One chat call as Traceloop records it, its own trace unless ``parent`` is given."""
    finish = "tool_calls" if any(p.get("type") == "tool_call" for p in output["parts"]) else "stop"
    attributes = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_REQUEST_MODEL: "smollm2-135m",
        sc.GEN_AI_INPUT_MESSAGES: json.dumps(inputs),
        sc.GEN_AI_OUTPUT_MESSAGES: json.dumps([output]),
        sc.GEN_AI_RESPONSE_FINISH_REASONS: [finish],
        sc.GEN_AI_USAGE_INPUT_TOKENS: 10,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: 3,
        sc.PROCESS_PID: pid,
        sc.THREAD_ID: thread,
    }
    if rollout_id is not None:
        attributes[sc.ROLLOUT_ID] = rollout_id  # as baggage puts it on every span
    end = end if end is not None else start + 0.5
    return factory.span(trace, "openai.chat", start, end, parent=parent, attributes=attributes, status=status)


def tool_loop(
    factory: SpansFactory, first_trace: int, start: float, question: str, expression: str, answer: str, **where: Any
) -> None:
    """A task as a tool loop runs it: a call that asks for the calculator, then one that answers."""
    asked = [text("system", SYSTEM), text("user", question)]
    call(factory, first_trace, start, asked, tool_call(f"c{first_trace}", expression), **where)
    carried = [*asked, tool_call(f"c{first_trace}", expression), tool_result(f"c{first_trace}", answer)]
    call(factory, first_trace + 1, start + 1, carried, text("assistant", answer), **where)


def trace_hex(trace: int) -> str:
    return format(trace, "032x")


def rollouts(factory: SpansFactory, config: JoinConfig | None = None) -> list[dict[str, Any]]:
    factory.write()
    spans = prepare_spans(scan_spans(factory.directory), config)
    return build_rollouts(spans).collect().to_dicts()


@pytest.fixture
def factory(tmp_path: Path) -> SpansFactory:
    return SpansFactory(tmp_path / "spans")


def test_a_tool_loop_without_a_span_of_its_own_is_one_rollout(factory: SpansFactory) -> None:
    tool_loop(factory, 1, 0, "What is 12 times 3?", "12*3", "36")
    (rollout,) = rollouts(factory)
    assert rollout["rollout_id"] == trace_hex(1), "the first call's trace names the rollout"
    assert rollout["trace_ids"] == [trace_hex(1), trace_hex(2)] and rollout["identity"] == "conversation"
    assert (rollout["n_llm_calls"], rollout["input_tokens"], rollout["output_tokens"]) == (2, 20, 6)
    question = json.dumps([{"role": "user", "content": "What is 12 times 3?"}])
    assert rollout["task_id"] == task_id_from_messages(question), "the task id comes from the first call"


def test_without_the_rule_each_call_was_a_rollout_and_a_lone_call_stays_one(factory: SpansFactory) -> None:
    tool_loop(factory, 1, 0, "What is 12 times 3?", "12*3", "36")
    call(factory, 3, 100, [text("user", "hello")], text("assistant", "hi"))
    by_id = {row["rollout_id"]: row for row in rollouts(factory)}
    assert sorted(by_id) == [trace_hex(1), trace_hex(3)]
    assert by_id[trace_hex(3)]["identity"] == "conversation" and by_id[trace_hex(3)]["n_llm_calls"] == 1


def test_messages_compare_canonically_not_as_raw_json(factory: SpansFactory) -> None:
    asked = [text("system", SYSTEM), text("user", "What is 2 plus 2?")]
    call(factory, 1, 0, asked, tool_call("c1", "2+2"))
    # The agent sends the assistant turn back re-serialized: arguments spaced differently, empty text
    # part, trailing whitespace in the question.
    echoed = {
        "role": "assistant",
        "parts": [
            {"type": "text", "content": ""},
            {"type": "tool_call", "id": "c1", "name": "calculator", "arguments": '{ "expression" : "2+2" }'},
        ],
    }
    carried = [text("system", SYSTEM), text("user", "What is 2 plus 2?  "), echoed, tool_result("c1", "4")]
    call(factory, 2, 1, carried, text("assistant", "4"))
    assert [row["n_llm_calls"] for row in rollouts(factory)] == [2]


def test_two_identical_tasks_at_once_in_two_threads_stay_two_rollouts(factory: SpansFactory) -> None:
    # Same question, same answers, interleaved in time; only the thread tells them apart.
    tool_loop(factory, 1, 0.0, "What is 7 times 6?", "7*6", "42", thread=1)
    tool_loop(factory, 3, 0.1, "What is 7 times 6?", "7*6", "42", thread=2)
    got = rollouts(factory)
    assert [row["trace_ids"] for row in got] == [[trace_hex(1), trace_hex(2)], [trace_hex(3), trace_hex(4)]]


def test_two_identical_tasks_at_once_in_one_thread_pair_one_to_one(factory: SpansFactory) -> None:
    # asyncio: one thread. Identical conversations pair one to one (which with which does not change
    # what they hold), never three calls in one rollout and one left alone.
    tool_loop(factory, 1, 0.0, "What is 7 times 6?", "7*6", "42")
    tool_loop(factory, 3, 0.1, "What is 7 times 6?", "7*6", "42")
    got = rollouts(factory)
    assert [row["n_llm_calls"] for row in got] == [2, 2]
    assert sorted(t for row in got for t in row["trace_ids"]) == [trace_hex(t) for t in (1, 2, 3, 4)]


def test_the_same_question_again_in_one_thread_is_a_new_rollout(factory: SpansFactory) -> None:
    tool_loop(factory, 1, 0, "What is 7 times 6?", "7*6", "42")
    tool_loop(factory, 3, 3, "What is 7 times 6?", "7*6", "42")
    assert [row["trace_ids"] for row in rollouts(factory)] == [
        [trace_hex(1), trace_hex(2)],
        [trace_hex(3), trace_hex(4)],
    ]


def test_a_rewritten_system_prompt_joins_by_sequence(factory: SpansFactory) -> None:
    """smolagents' last step: a new system prompt, the memory replayed, the task asked again."""
    question = "What is 9 times 9?"
    asked = [text("system", SYSTEM), text("user", question)]
    call(factory, 1, 0, asked, tool_call("c1", "9*9"))
    history = [*asked, tool_call("c1", "9*9"), tool_result("c1", "81")]
    call(factory, 2, 1, history, tool_call("c2", "81"))
    rewritten = [text("system", "An agent tried to answer a user query but got stuck."), *history[1:]]
    call(factory, 3, 2, [*rewritten, text("user", f"Now answer: {question}")], text("assistant", "81"))
    # Another process asking the same question at the same time is not joined.
    call(
        factory,
        4,
        2.5,
        [text("system", "Other."), text("user", question), text("assistant", "?")],
        text("assistant", "81"),
        pid=7,
    )
    got = {row["rollout_id"]: row for row in rollouts(factory)}
    assert got[trace_hex(1)]["trace_ids"] == [trace_hex(t) for t in (1, 2, 3)]
    assert got[trace_hex(1)]["identity"] == "sequence"
    assert got[trace_hex(4)]["trace_ids"] == [trace_hex(4)]


def test_sequence_needs_the_same_thread_and_calls_within_the_gap(factory: SpansFactory) -> None:
    asked = [text("system", SYSTEM), text("user", "What is 5 minus 1?")]
    call(factory, 1, 0, asked, tool_call("c1", "5-1"))
    rewritten = [text("system", "Rewritten."), asked[1], tool_call("c1", "5-1"), tool_result("c1", "4")]
    call(factory, 2, 1, rewritten, text("assistant", "4"), thread=2)  # another thread
    call(factory, 3, 60, rewritten, text("assistant", "4"))  # same thread, a minute later
    assert [row["trace_ids"] for row in rollouts(factory)] == [[trace_hex(1)], [trace_hex(2)], [trace_hex(3)]]
    joined = rollouts(factory, JoinConfig(gap=dt.timedelta(minutes=2)))
    assert [row["trace_ids"] for row in joined] == [[trace_hex(1), trace_hex(3)], [trace_hex(2)]]


def test_a_conversation_carried_on_after_the_window_is_a_new_rollout(factory: SpansFactory) -> None:
    asked = [text("user", "Remember 7.")]
    call(factory, 1, 0, asked, text("assistant", "OK."))
    call(factory, 2, 700, [*asked, text("assistant", "OK."), text("user", "What did I say?")], text("assistant", "7"))
    assert len(rollouts(factory)) == 2, "the default window is 10 minutes"
    assert len(rollouts(factory, JoinConfig(window=dt.timedelta(minutes=15)))) == 1


def test_explicit_ids_and_real_root_spans_come_first(factory: SpansFactory) -> None:
    asked = [text("system", SYSTEM), text("user", "What is 1 plus 1?")]
    root = factory.root(1, 0, 5)  # the agent's own span: one trace, one rollout
    call(factory, 1, 1, asked, tool_call("c1", "1+1"), parent=root)
    carried = [*asked, tool_call("c1", "1+1"), tool_result("c1", "2")]
    call(factory, 2, 6, carried, text("assistant", "2"))  # a loose call: never joins a rooted trace
    explicit = factory.span(3, "step", 7, 8, attributes={sc.ROLLOUT_ID: "episode-9"})
    call(factory, 3, 7.5, carried, text("assistant", "2"), parent=explicit, rollout_id="episode-9")
    got = {row["rollout_id"]: row["identity"] for row in rollouts(factory)}
    assert got == {trace_hex(1): "trace", trace_hex(2): "conversation", "episode-9": "explicit"}


def test_other_services_never_join(factory: SpansFactory, tmp_path: Path) -> None:
    asked = [text("user", "Remember 7.")]
    call(factory, 1, 0, asked, text("assistant", "OK."))
    factory.write()
    other = SpansFactory(tmp_path / "spans", service="another-agent")
    call(other, 2, 1, [*asked, text("assistant", "OK."), text("user", "And?")], text("assistant", "7"))
    other.write()
    assert len(build_rollouts(scan_spans(tmp_path / "spans")).collect()) == 2


def test_a_conversation_that_ended_is_complete_and_one_waiting_for_a_tool_is_not(factory: SpansFactory) -> None:
    tool_loop(factory, 1, 0, "What is 3 plus 3?", "3+3", "6")
    call(factory, 3, 0, [text("user", "What is 8 plus 8?")], tool_call("c3", "8+8"))  # its tool still runs
    factory.write()
    spans = scan_spans(factory.directory)
    build = build_closed_rollouts(spans, at(5), RolloutConfig(lateness=dt.timedelta(minutes=10)))
    assert build.rollouts.get_column("rollout_id").to_list() == [trace_hex(1)]
    assert build.deferred.get_column("rollout_id").to_list() == [trace_hex(3)]


def test_a_call_of_a_final_answer_tool_ends_the_conversation(factory: SpansFactory) -> None:
    """smolagents ends every run by calling its final_answer tool: no call follows it."""
    asked = [text("user", "What is 3 plus 3?")]
    call(factory, 1, 0, asked, tool_call("c1", "3+3"))
    answer = {
        "role": "assistant",
        "parts": [{"type": "tool_call", "id": "c2", "name": "final_answer", "arguments": {}}],
    }
    call(factory, 2, 1, [*asked, tool_call("c1", "3+3"), tool_result("c1", "6")], answer)
    factory.write()
    build = build_closed_rollouts(scan_spans(factory.directory), at(5))
    assert build.rollouts.get_column("rollout_id").to_list() == [trace_hex(1)] and build.deferred.height == 0


def test_a_failed_step_fails_the_joined_rollout_with_its_message(factory: SpansFactory) -> None:
    asked = [text("user", "What is 3 plus 3?")]
    call(factory, 1, 0, asked, tool_call("c1", "3+3"))
    call(
        factory, 2, 1, [*asked, tool_call("c1", "3+3"), tool_result("c1", "6")], text("assistant", "6"), status="ERROR"
    )
    (rollout,) = rollouts(factory)
    assert (rollout["status"], rollout["error_message"]) == ("error", "failed")


def test_a_bucketed_build_keeps_each_conversation_whole(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    for task in range(12):
        tool_loop(factory, 10 * task + 1, task * 5, f"What is {task} plus {task}?", f"{task}+{task}", str(2 * task))
    factory.write()
    whole = build_transitions(tmp_path / "data", tmp_path / "one", now=LATER)
    config = parse_config({"advantage": {"group_by": "rollout_id"}})
    bucketed = build_transitions(tmp_path / "data", tmp_path / "many", config, now=LATER, bucket_bytes=1024)
    assert bucketed.summary["buckets"] > 1
    for result in (whole, bucketed):
        transitions = pl.read_parquet(result.transitions_files)
        assert result.summary["rollouts"] == 12 and transitions.height == 24
        assert transitions.group_by("rollout_id").len().get_column("len").to_list() == [2] * 12


def test_messages_of_any_shape_decode_without_failing() -> None:
    texts = pl.Series(
        "m",
        [
            '[{"role":"user","content":"hi"}]',
            '[{"role":"user","content":[{"type":"text","text":"hi"}]},7]',
            '{"role":"user"}',
            "not json",
            None,
            '[{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{"x":1}}}],"tool_call_id":3}]',
        ],
    )
    decoded = decode_messages(texts).to_list()
    # One odd row sends the batch down the row-by-row path; every row still decodes as far as it can.
    assert decoded[0] == decoded[1] == [{"role": "user", "content": "hi", "tool_call_id": None, "tool_calls": []}]
    assert decoded[2:5] == [None, None, None]
    assert decoded[5] == [
        {
            "role": "assistant",
            "content": None,
            "tool_call_id": "3",
            "tool_calls": [{"function": {"name": "f", "arguments": '{"x":1}'}}],
        }
    ]
