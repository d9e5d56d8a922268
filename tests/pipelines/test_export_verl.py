"""Exporters from the transitions dataset to verl's RL, SFT and replay Parquet files.

The same files read by verl's own dataset classes: tests/contracts/test_verl_contract.py.
"""

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.export_messages import ARGUMENTS_AS_TEXT
from tracelearn.pipelines.export_verl import (
    CHAT_MESSAGE,
    EXTRA_INFO,
    REPLAY_COLUMN,
    REPLAY_SCHEMA,
    RL_SCHEMA,
    SFT_SCHEMA,
    ExportError,
    load_transitions,
    to_verl_replay,
    to_verl_rl,
    to_verl_sft,
    write_verl_export,
)

NOW = at(3600)
# Eight tasks x two rollouts (rewards 1 and 0); each rollout: planner call, writer call, reward.
TASKS = [f"t{number}" for number in range(8)]


def write_spans(data: Path) -> None:
    factory = SpansFactory(data / "spans")
    trace = 0
    for task in TASKS:
        for value in (1.0, 0.0):
            trace += 1
            root = factory.root(trace, 0, 100, task_id=task)
            factory.llm(trace, root, 1, user=f"{task}: plan", task_id=task, agent="planner")
            factory.llm(trace, root, 3, user=f"{task}: write", task_id=task, agent="writer")
            factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    write_spans(tmp_path / "data")
    build_transitions(tmp_path / "data", tmp_path / "out", now=NOW)
    return tmp_path / "out"


def with_token_ids(transitions: pl.LazyFrame) -> pl.LazyFrame:
    """Server token ids on every writer call (the planner calls keep none)."""
    writer = pl.col("agent_name") == "writer"
    return transitions.with_columns(
        pl.when(writer).then(pl.lit([1, 2, 3], dtype=pl.List(pl.Int32))).alias("prompt_token_ids"),
        pl.when(writer).then(pl.lit([7, 8], dtype=pl.List(pl.Int32))).alias("response_token_ids"),
        pl.when(writer).then(pl.lit([-0.5, -0.25], dtype=pl.List(pl.Float32))).alias("response_logprobs"),
    )


def written(paths: list[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in paths])


def test_rl_rows_are_verl_prompts_with_provenance(out: Path, tmp_path: Path) -> None:
    transitions = load_transitions(out)
    export = to_verl_rl(transitions, val_fraction=0.25)
    paths = write_verl_export(export, tmp_path / "rl")
    assert [path.name for path in paths] == ["train.parquet", "val.parquet"]
    table = written(paths)
    assert pq.read_schema(paths[0]).remove_metadata() == RL_SCHEMA
    assert table.schema.field("prompt").type == pa.list_(CHAT_MESSAGE)
    assert table.schema.field("extra_info").type == EXTRA_INFO
    # one row per task: both rollouts of a task start from the same prompt
    assert table.num_rows == len(TASKS) and export.skipped == {"bad_messages": 0, "duplicate_prompt": len(TASKS)}
    rows = table.to_pylist()
    captured = transitions.filter(pl.col("step_index") == 0).collect()
    by_span = dict(zip(captured["span_id"], captured["prompt_messages"], strict=True))
    for row in rows:
        info = row["extra_info"]
        assert row["prompt"] == json.loads(by_span[info["span_id"]])
        assert row["prompt"][-1] == {"role": "user", "content": f"{info['task_id']}: plan"}
        assert row["reward_model"] == {"style": "rule", "ground_truth": ""}
        assert row["data_source"] == "tracelearn" and row["ability"] == "agent"
        assert info["n_rollouts"] == 2 and info["step_index"] == 0 and len(info["pipeline_config_hash"]) == 64
    for split in ("train", "val"):
        indexes = [row["extra_info"]["index"] for row in rows if row["extra_info"]["split"] == split]
        assert indexes == list(range(len(indexes)))


def test_split_keeps_each_task_in_one_split_and_is_stable(out: Path) -> None:
    transitions = load_transitions(out)
    export = to_verl_sft(transitions, val_fraction=0.5)
    tasks = {name: set(rows["extra_info"].struct.field("task_id").to_list()) for name, rows in export.splits.items()}
    assert tasks["train"] and tasks["val"] and not tasks["train"] & tasks["val"]
    again = to_verl_sft(load_transitions(out), val_fraction=0.5)
    for name, rows in export.splits.items():
        assert rows.equals(again.splits[name])
    assert to_verl_sft(transitions, val_fraction=0.0).splits["val"].height == 0


def test_sft_messages_end_with_the_response_and_respect_min_reward(out: Path, tmp_path: Path) -> None:
    transitions = load_transitions(out)
    export = to_verl_sft(transitions, min_reward=0.5)
    paths = write_verl_export(export, tmp_path / "sft")
    table = written(paths)
    assert pq.read_schema(paths[0]).remove_metadata() == SFT_SCHEMA
    # no message has tool calls, a tool call id or a name: no chat template sees those keys as null
    assert table.schema.field("messages").type == pa.list_(CHAT_MESSAGE)
    assert export.skipped["below_min_reward"] == 2 * len(TASKS)  # the reward-0 rollouts' calls
    assert table.num_rows == 2 * len(TASKS)
    for row in table.to_pylist():
        assert row["extra_info"]["reward"] == 1.0
        last = row["messages"][-1]
        assert last["role"] == "assistant" and last["content"] == "42"
        assert [message["role"] for message in row["messages"]] == ["system", "user", "assistant"]


def tool_exchange(arguments: object) -> str:
    """A response that calls a tool (arguments as OpenAI sends them: JSON text) and reads its result."""
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": json.dumps(arguments)}}
    return json.dumps(
        [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "3"},
        ]
    )


def test_sft_keeps_tool_calls_with_arguments_as_objects(out: Path, tmp_path: Path) -> None:
    transitions = load_transitions(out).with_columns(pl.lit(tool_exchange({"a": 1, "b": 2})).alias("response"))
    export = to_verl_sft(transitions)
    table = written(write_verl_export(export, tmp_path / "sft"))
    messages = table["messages"].to_pylist()[0]
    assert [message["role"] for message in messages] == ["system", "user", "assistant", "tool"]
    call, result = messages[-2], messages[-1]
    assert call["content"] is None
    function = {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert call["tool_calls"] == [{"id": "c1", "type": "function", "function": function}]
    assert result["tool_call_id"] == "c1" and result["content"] == "3"
    # written only because some message has them; nobody here has a name
    assert set(call) == {"role", "content", "tool_calls", "tool_call_id"}
    assert export.notes == []


def test_sft_arguments_that_fit_no_one_arrow_type_stay_json_text_and_say_so(out: Path) -> None:
    transitions = load_transitions(out)
    spans = transitions.collect()["span_id"].to_list()
    mixed = transitions.with_columns(
        pl.when(pl.col("span_id") == spans[0])
        .then(pl.lit(tool_exchange({"a": "one"})))
        .otherwise(pl.lit(tool_exchange({"a": [1, 2]})))
        .alias("response")
    )
    export = to_verl_sft(mixed)
    arguments = {
        message["tool_calls"][0]["function"]["arguments"]
        for rows in export.splits.values()
        for conversation in rows["messages"].to_list()
        for message in conversation
        if message.get("tool_calls")
    }
    assert arguments == {'{"a": "one"}', '{"a": [1, 2]}'}
    assert export.notes == [ARGUMENTS_AS_TEXT]


def test_replay_columns_are_the_stored_tokens(out: Path, tmp_path: Path) -> None:
    transitions = with_token_ids(load_transitions(out))
    export = to_verl_replay(transitions)
    paths = write_verl_export(export, tmp_path / "replay")
    table = written(paths)
    assert pq.read_schema(paths[0]).remove_metadata() == REPLAY_SCHEMA
    assert export.skipped["without_token_ids"] == 2 * len(TASKS)  # the planner calls
    assert table.num_rows == 2 * len(TASKS)
    stored = transitions.filter(pl.col("agent_name") == "writer").collect()
    rewards = dict(zip(stored["span_id"], stored["reward"], strict=True))
    advantages = dict(zip(stored["span_id"], stored["advantage"], strict=True))
    for row in table.to_pylist():
        span, tokens = row["extra_info"]["span_id"], row[REPLAY_COLUMN]
        assert tokens["prompt_ids"] == [1, 2, 3] and tokens["response_ids"] == [7, 8]
        assert tokens["response_logprobs"] == [-0.5, -0.25]
        assert tokens["response_mask"] == [1, 1]  # no loss mask stored: every response token trains
        assert tokens["advantage"] == advantages[span]
        assert row["extra_info"]["reward"] == rewards[span]


def test_bad_json_is_counted_with_its_ids_not_a_crash(out: Path) -> None:
    transitions = load_transitions(out)
    bad_span = transitions.collect()["span_id"][0]
    broken = transitions.with_columns(
        pl.when(pl.col("span_id") == bad_span)
        .then(pl.lit("[{not json"))
        .otherwise(pl.col("prompt_messages"))
        .alias("prompt_messages")
    )
    export = to_verl_sft(broken)
    assert export.skipped["bad_messages"] == 1
    assert sum(rows.height for rows in export.splits.values()) == 4 * len(TASKS) - 1
    [bad] = export.bad_messages
    assert bad.span_id == bad_span and bad.trace_id is not None
    assert bad.error.startswith("prompt_messages: ")


def test_several_config_hashes_need_a_choice(out: Path) -> None:
    [part] = sorted((out / "transitions").rglob("*.parquet"))
    other = pq.read_table(part)
    other = other.set_column(
        other.schema.get_field_index("pipeline_config_hash"),
        other.schema.field("pipeline_config_hash"),
        pa.array(["f" * 64] * other.num_rows, pa.string()),
    )
    pq.write_table(other, part.with_name("part-ffffffffffffffff.parquet"))
    with pytest.raises(ExportError, match="pick one with --config-hash") as error:
        load_transitions(out)
    assert "ffffffffffffffff" in str(error.value)
    chosen = load_transitions(out / "transitions", "fff").collect()
    assert set(chosen["pipeline_config_hash"]) == {"f" * 64}
    with pytest.raises(ExportError, match="must match exactly one"):
        load_transitions(out, "0123")


def test_missing_path_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such file or directory"):
        load_transitions(tmp_path / "nowhere")
