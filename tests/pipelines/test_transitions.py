"""Spans + rollouts -> transitions over real spans Parquet files written by the capture path."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from support.spans_factory import SpansFactory

from tracelearn.pipelines.advantages import grpo_advantages
from tracelearn.pipelines.credit import assign_credit
from tracelearn.pipelines.llm_calls import attach_token_ids
from tracelearn.pipelines.rollouts import build_rollouts
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.pipelines.transitions import (
    TRANSITION_COLUMNS,
    extract_transitions,
    merge_trajectories,
    select_llm_calls,
    transition_counts,
    transitions_to_arrow,
)
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, TRANSITIONS


@pytest.fixture
def factory(tmp_path: Path) -> SpansFactory:
    return SpansFactory(tmp_path / "spans")


def token_attributes(
    prompt_ids: Sequence[int] | None, response_ids: Sequence[int] | None, logprobs: Sequence[float] | None
) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if prompt_ids is not None:
        attributes[sc.PROMPT_TOKEN_IDS] = list(prompt_ids)
    if response_ids is not None:
        attributes[sc.RESPONSE_TOKEN_IDS] = list(response_ids)
        attributes[sc.TOKEN_IDS_STATUS] = sc.TOKEN_IDS_FROM_SERVER
    if logprobs is not None:
        attributes[sc.RESPONSE_LOGPROBS] = list(logprobs)
    return attributes


def call(
    factory: SpansFactory,
    trace: int,
    parent: int | None,
    start: float,
    agent: str | None = "writer",
    response_id: str | None = None,
    prompt_ids: Sequence[int] | None = None,
    response_ids: Sequence[int] | None = None,
    logprobs: Sequence[float] | None = None,
    operation: str = "chat",
    end: float | None = None,
    status: str = "UNSET",
    user: str = "2+2?",
    extra: dict[str, Any] | None = None,
) -> int:
    """An LLM call span as an instrumented agent records it, optionally with server token ids."""
    attributes: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: operation,
        sc.GEN_AI_REQUEST_MODEL: "smollm2-135m",
        f"{sc.GEN_AI_PROMPT_PREFIX}0.role": "user",
        f"{sc.GEN_AI_PROMPT_PREFIX}0.content": user,
        f"{sc.GEN_AI_COMPLETION_PREFIX}0.role": "assistant",
        f"{sc.GEN_AI_COMPLETION_PREFIX}0.content": f"answer at {start}",
        **token_attributes(prompt_ids, response_ids, logprobs),
        **(extra or {}),
    }
    if agent is not None:
        attributes[sc.AGENT_NAME] = agent
    if response_id is not None:
        attributes[sc.GEN_AI_RESPONSE_ID] = response_id
    name = f"{operation} smollm2-135m"
    return factory.span(trace, name, start, end, parent=parent, attributes=attributes, status=status)


def episode(factory: SpansFactory, trace: int = 1, reward: float = 1.0, task: str = "t") -> int:
    root = factory.root(trace, 0, 100, task_id=task)
    factory.reward(trace, root, 99, reward, task_id=task)
    return root


def transitions_of(factory: SpansFactory, **select: Any) -> pl.DataFrame:
    factory.write()
    spans = scan_spans(factory.directory)
    return extract_transitions(spans, build_rollouts(spans), pipeline_config_hash="cfg-1", **select).collect()


def test_selects_by_agent_regex_and_operation_in_call_order(factory: SpansFactory) -> None:
    root = episode(factory)
    call(factory, 1, root, 5, agent="planner", response_id="r-plan")
    call(factory, 1, root, 1, agent="writer", response_id="r-write-1")
    call(factory, 1, root, 3, agent="critic", response_id="r-critic")
    call(factory, 1, root, 7, agent="writer", response_id="r-embed", operation="embeddings")
    call(factory, 1, root, 9, agent="writer-v2", response_id="r-other")
    rows = transitions_of(factory, agent="writer|planner", llm_call="chat").to_dicts()
    assert [(row["step_index"], row["agent_name"]) for row in rows] == [(0, "writer"), (1, "planner")]
    assert all(row["reward"] == 1.0 and row["task_id"] == "t" for row in rows)
    assert rows[0]["rewards"] == [{"key": "reward", "value": 1.0}]
    assert rows[0]["model"] == "smollm2-135m" and rows[0]["pipeline_config_hash"] == "cfg-1"
    assert '"content":"2+2?"' in rows[0]["prompt_messages"].replace(" ", "")
    assert rows[0]["credited_reward"] is None and rows[0]["advantage"] is None and rows[0]["loss_mask"] is None


def test_without_select_every_llm_call_counts(factory: SpansFactory) -> None:
    root = episode(factory)
    call(factory, 1, root, 1, agent=None)
    call(factory, 1, root, 2, agent="critic")
    assert transitions_of(factory).height == 2


def test_retry_with_the_same_response_id_counts_once_keeping_the_successful_one(factory: SpansFactory) -> None:
    root = episode(factory)
    call(factory, 1, root, 1, response_id="r-1", end=2, status="ERROR")
    kept = call(factory, 1, root, 1.5, response_id="r-1", end=3)
    call(factory, 1, root, 1.6, response_id="r-1", end=4)
    call(factory, 1, root, 5, response_id=None)
    call(factory, 1, root, 6, response_id=None)
    rows = transitions_of(factory).to_dicts()
    assert len(rows) == 3, "same response id once; calls without a response id are never merged"
    assert rows[0]["span_id"] == format(kept, "016x")
    assert [row["step_index"] for row in rows] == [0, 1, 2]


def test_llm_call_nested_in_an_llm_call_counts_once_and_lends_its_token_ids(factory: SpansFactory) -> None:
    root = episode(factory)
    outer = call(factory, 1, root, 1, end=5, response_id="r-outer")
    http = factory.span(1, "POST /v1/chat/completions", 1.1, 4.9, parent=outer)
    call(factory, 1, http, 1.2, end=4.8, response_id="r-inner", prompt_ids=[1, 2], response_ids=[3], logprobs=[-0.5])
    rows = transitions_of(factory).to_dicts()
    assert len(rows) == 1
    assert rows[0]["span_id"] == format(outer, "016x")
    assert rows[0]["response_token_ids"] == [3] and rows[0]["token_ids_source"] == "server"


def test_token_ids_are_joined_from_a_token_ids_span_and_missing_ones_counted(factory: SpansFactory) -> None:
    root = episode(factory)
    call(factory, 1, root, 1, response_id="r-1")
    call(factory, 1, root, 3, response_id="r-2")
    token_span = {sc.SPAN_TYPE: sc.TYPE_TOKEN_IDS, sc.GEN_AI_RESPONSE_ID: "r-1"}
    factory.span(1, sc.SPAN_TOKEN_IDS, 1.1, attributes={**token_span, **token_attributes([1, 2], [7, 8], [-1, -2])})
    factory.span(1, sc.SPAN_TOKEN_IDS, 1.2, attributes={**token_span, **token_attributes([1], [9], [-3])})
    factory.write()
    spans = scan_spans(factory.directory)
    joined = attach_token_ids(spans).filter(pl.col("span_type") == "llm").sort("start_time").collect()
    assert joined.get_column("response_token_ids").to_list() == [[7, 8], None]
    assert joined.get_column("token_ids_status").to_list() == ["server", "not_captured"]
    transitions = extract_transitions(spans, build_rollouts(spans))
    rows = transitions.collect().to_dicts()
    assert rows[0]["prompt_token_ids"] == [1, 2]
    assert rows[0]["response_logprobs"] == pytest.approx([-1.0, -2.0])
    assert [row["token_ids_source"] for row in rows] == ["server", None]
    assert transition_counts(transitions) == {"transitions": 2, "rollouts": 1, "without_token_ids": 1}


def test_token_ids_in_a_trace_of_their_own_join_their_call_by_response_id(factory: SpansFactory) -> None:
    # OpenInference's LangChain span is not the current span while its request runs: the token-id hook
    # records on a root span of its own trace, which only the response id (and the time) ties to the call.
    root = episode(factory)
    call(factory, 1, root, 1, end=3, response_id="r-1")
    call(factory, 1, root, 4, end=6, response_id="r-2")
    call(factory, 1, root, 7, end=9, response_id="r-repeated")
    token_span = {sc.SPAN_TYPE: sc.TYPE_TOKEN_IDS}
    factory.span(2, sc.SPAN_TOKEN_IDS, 2.5, 2.6, attributes={
        **token_span, sc.GEN_AI_RESPONSE_ID: "r-1", **token_attributes([1, 2], [7, 8], [-1, -2])})
    # Outside the call's time: another call that happens to share the id.
    factory.span(3, sc.SPAN_TOKEN_IDS, 10, 10.1, attributes={
        **token_span, sc.GEN_AI_RESPONSE_ID: "r-2", **token_attributes([1], [5], [-1])})
    # A server repeating an id: two detached token spans with it, so neither is trusted.
    for trace in (4, 5):
        factory.span(trace, sc.SPAN_TOKEN_IDS, 8, 8.1, attributes={
            **token_span, sc.GEN_AI_RESPONSE_ID: "r-repeated", **token_attributes([1], [6], [-1])})
    factory.write()
    joined = attach_token_ids(scan_spans(factory.directory)).filter(pl.col("span_type") == "llm")
    rows = joined.sort("start_time").collect()
    assert rows.get_column("response_token_ids").to_list() == [[7, 8], None, None]
    assert rows.get_column("token_ids_status").to_list() == ["server", "not_captured", "not_captured"]


def test_select_llm_calls_rejects_a_bad_agent_regex(factory: SpansFactory) -> None:
    episode(factory)
    factory.write()
    with pytest.raises(ValueError, match=r"select.agent 'writer\(' is not a valid regular expression"):
        select_llm_calls(scan_spans(factory.directory), agent="writer(")


def test_trajectory_merge_of_a_multi_turn_agent_masks_the_observation(factory: SpansFactory) -> None:
    root = episode(factory)
    call(factory, 1, root, 1, response_id="a", prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2])
    # The tool result [9, 9] sits between the first response and the second generation.
    second_prompt = [1, 2, 3, 4, 9, 9]
    call(factory, 1, root, 3, response_id="b", prompt_ids=second_prompt, response_ids=[5], logprobs=[-0.3])
    call(factory, 1, root, 5, response_id="c", prompt_ids=[1, 2, 0], response_ids=[6], logprobs=[-0.4])
    call(factory, 1, root, 7, agent="planner", response_id="d", prompt_ids=[1, 2, 0, 6], response_ids=[8])
    merged = merge_trajectories(pl.LazyFrame(transitions_of(factory))).collect().to_dicts()
    assert [(row["agent_name"], row["step_index"]) for row in merged] == [("writer", 0), ("writer", 2), ("planner", 3)]
    first = merged[0]
    assert first["prompt_token_ids"] == [1, 2]
    assert first["response_token_ids"] == [3, 4, 9, 9, 5]
    assert first["loss_mask"] == [1, 1, 0, 0, 1]
    assert first["response_logprobs"] == pytest.approx([-0.1, -0.2, 0.0, 0.0, -0.3])
    assert merged[1]["loss_mask"] == [1], "a call that does not extend the previous one stays alone"
    assert merged[2]["response_logprobs"] is None and merged[2]["loss_mask"] == [1]


def test_merge_by_hand_made_ids_never_merges_calls_without_ids() -> None:
    ids = pl.List(pl.Int32)
    columns = {
        "rollout_id": pl.Series(["r"] * 4),
        "agent_name": pl.Series(["a"] * 4),
        "step_index": pl.Series([3, 0, 1, 2], dtype=pl.Int32),
        "prompt_token_ids": pl.Series([[1, 2, 3, 4, 7, 4], [1], None, [1, 2, 3]], dtype=ids),
        "response_token_ids": pl.Series([[5], [2], None, [4]], dtype=ids),
        "response_logprobs": pl.Series([[-0.5], [-0.2], None, [-0.4]], dtype=pl.List(pl.Float32)),
    }
    frame = pl.LazyFrame(columns).with_columns(
        pl.lit(None).alias(column) for column in TRANSITION_COLUMNS if column not in columns
    )
    rows = merge_trajectories(frame).collect().to_dicts()
    # Step 1 has no ids, so step 2 does not continue step 0 even though [1] + [2] prefixes [1, 2, 3].
    assert [row["step_index"] for row in rows] == [0, 1, 2]
    assert rows[2]["response_token_ids"] == [4, 7, 4, 5]
    assert rows[2]["loss_mask"] == [1, 0, 0, 1]
    assert rows[1]["loss_mask"] is None and rows[1]["response_token_ids"] is None


def test_output_conforms_to_the_transitions_schema_and_round_trips_parquet(
    factory: SpansFactory, tmp_path: Path
) -> None:
    root = episode(factory)
    call(factory, 1, root, 1, response_id="a", prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2])
    call(factory, 1, root, 3, response_id="b", prompt_ids=[1, 2, 3, 4, 9], response_ids=[5], logprobs=[-0.3])
    frame = merge_trajectories(pl.LazyFrame(transitions_of(factory))).collect()
    table = transitions_to_arrow(frame)
    assert table.schema.equals(TRANSITIONS.schema)
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == str(TRANSITIONS.version).encode()
    path = tmp_path / "transitions.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path)
    assert back.equals(table)
    assert back.column("rewards").to_pylist() == [[("reward", 1.0)]]
    assert back.column("loss_mask").to_pylist() == [[1, 1, 0, 1]]


def test_credit_and_advantages_run_on_the_transitions(factory: SpansFactory) -> None:
    for trace, reward in ((1, 1.0), (2, 0.0)):
        root = episode(factory, trace=trace, reward=reward, task="same-task")
        call(factory, trace, root, 1, response_id=f"{trace}-a")
        call(factory, trace, root, 2, response_id=f"{trace}-b")
    transitions = pl.LazyFrame(transitions_of(factory))
    credited = assign_credit(transitions, "discounted", gamma=0.5)
    rows = grpo_advantages(credited, group_by="task_id").collect().sort("rollout_id", "step_index").to_dicts()
    assert [row["credited_reward"] for row in rows] == [0.5, 1.0, 0.0, 0.0]
    advantages = [row["advantage"] for row in rows]
    assert advantages[0] == advantages[1] > 0 > advantages[2] == advantages[3]
    assert transitions_to_arrow(pl.DataFrame(rows).select(TRANSITION_COLUMNS)).num_rows == 4


def test_a_call_without_an_agent_name_takes_its_nearest_named_ancestors(factory: SpansFactory) -> None:
    """An OpenInference AGENT span is named by normalization only (smolagents' ``<agent>.run``), so
    capture could not pass the name down to the calls inside it."""
    agent = factory.span(1, "calculator_agent.run", 0, 10, attributes={"openinference.span.kind": "AGENT"})
    step = factory.span(1, "Step 1", 1, 9, parent=agent, attributes={"openinference.span.kind": "CHAIN"})
    call(factory, 1, step, 2, agent=None, response_id="r-1")
    call(factory, 2, None, 2, agent=None, response_id="r-2")  # no ancestor: stays unnamed
    rows = transitions_of(factory).sort("trace_id").to_dicts()
    assert [row["agent_name"] for row in rows] == ["calculator_agent", None]


def test_sampling_parameters_and_the_model_version_reach_the_transition(factory: SpansFactory) -> None:
    root = episode(factory)
    sampled = {sc.GEN_AI_REQUEST_TEMPERATURE: 0.7, sc.GEN_AI_REQUEST_TOP_P: 0.9, sc.GEN_AI_REQUEST_TOP_K: 20}
    call(factory, 1, root, 1, response_id="r-1", extra={**sampled, sc.MODEL_VERSION: "calc@3+aaaaaaaaaaaa"})
    # The version from the token-id span (the response's system_fingerprint), joined by response id.
    call(factory, 1, root, 3, response_id="r-2", extra={sc.GEN_AI_REQUEST_TEMPERATURE: 1.0})
    factory.span(1, sc.SPAN_TOKEN_IDS, 3.1, attributes={
        sc.SPAN_TYPE: sc.TYPE_TOKEN_IDS, sc.GEN_AI_RESPONSE_ID: "r-2",
        sc.OPENAI_RESPONSE_SYSTEM_FINGERPRINT: "calc@4+bbbbbbbbbbbb", **token_attributes([1], [2], [-0.5])})
    # The gateway's "unknown" is no version.
    call(factory, 1, root, 5, response_id="r-3", extra={sc.MODEL_VERSION: "unknown"})
    rows = transitions_of(factory).to_dicts()
    assert [(r["temperature"], r["top_p"], r["top_k"], r["model_version"]) for r in rows] == [
        (0.7, 0.9, 20, "calc@3+aaaaaaaaaaaa"),
        (1.0, None, None, "calc@4+bbbbbbbbbbbb"),
        (None, None, None, None),
    ]


def test_trajectory_merge_keeps_calls_sampled_otherwise_apart(factory: SpansFactory) -> None:
    root = episode(factory)
    warm = {sc.GEN_AI_REQUEST_TEMPERATURE: 0.7, sc.MODEL_VERSION: "calc@3+aaaaaaaaaaaa"}
    call(factory, 1, root, 1, response_id="a", prompt_ids=[1, 2], response_ids=[3], logprobs=[-0.1], extra=warm)
    call(factory, 1, root, 3, response_id="b", prompt_ids=[1, 2, 3, 9], response_ids=[5], logprobs=[-0.3],
         extra=warm)
    # Extends the previous call's ids, but was sampled at another temperature: a row of its own.
    call(factory, 1, root, 5, response_id="c", prompt_ids=[1, 2, 3, 9, 5, 9], response_ids=[6], logprobs=[-0.4],
         extra={**warm, sc.GEN_AI_REQUEST_TEMPERATURE: 1.0})
    merged = merge_trajectories(pl.LazyFrame(transitions_of(factory))).collect().to_dicts()
    assert [(r["step_index"], r["response_token_ids"], r["temperature"]) for r in merged] == [
        (0, [3, 9, 5], 0.7),
        (2, [6], 1.0),
    ]
