"""``build_transitions``: spans written by the capture path -> rollouts + credited transitions on disk."""

import datetime as dt
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions, output_file_name
from tracelearn.pipelines.config import PipelineConfigError, config_hash, load_config, parse_config
from tracelearn.pipelines.spans_input import spans_dates
from tracelearn.pipelines.stages import StageError
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, TRANSITIONS

NOW = at(3600)  # an hour after the factory's spans: every rollout is closed
REWARDS = {"t1": [1.0, 0.0, 1.0], "t2": [0.5, 0.5, 0.5]}  # t2 has no learning signal


def write_spans(data: Path, unrewarded: bool = False) -> None:
    """Two tasks x three rollouts; each rollout: planner call, tool, writer call, reward.

    ``unrewarded`` adds a seventh rollout (task t3) with one call and no reward.
    """
    factory = SpansFactory(data / "spans")
    trace = 0
    for task, values in REWARDS.items():
        for value in values:
            trace += 1
            root = factory.root(trace, 0, 100, task_id=task)
            factory.llm(trace, root, 1, user=f"{task}: plan", task_id=task, agent="planner")
            factory.tool(trace, root, 2, task_id=task)
            factory.llm(trace, root, 3, user=f"{task}: write", task_id=task, agent="writer")
            factory.reward(trace, root, 99, value, task_id=task)
    if unrewarded:
        root = factory.root(99, 0, 100, task_id="t3")
        factory.llm(99, root, 1, user="t3: plan", task_id="t3", agent="planner")
    factory.write()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_spans(root)
    return root


def read(files: list[Path]) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(path) for path in files])


def test_build_writes_credited_transitions_with_advantages(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = build_transitions(data, out, now=NOW)

    name = output_file_name(result.config_hash)
    assert result.config_hash == config_hash(load_config(None))
    assert result.transitions_files == [out / "transitions" / "date=2026-11-21" / name]
    assert result.rollouts_files == [out / "rollouts" / "date=2026-11-21" / name]
    assert result.summary["rollouts"] == 6
    assert result.summary["deferred"] == 0
    assert result.summary["transitions"] == 12
    assert result.summary["without_token_ids"] == 12
    assert result.summary["groups"] == 2 and result.summary["zero_signal_groups"] == 1
    assert result.summary["files_written"] == 2

    transitions = read(result.transitions_files)
    metadata = pq.read_schema(result.transitions_files[0]).metadata
    assert metadata[SCHEMA_VERSION_KEY] == str(TRANSITIONS.version).encode()
    assert transitions.columns == list(TRANSITIONS.schema.names)
    assert set(transitions["pipeline_config_hash"]) == {result.config_hash}
    assert (transitions["credited_reward"] == transitions["reward"]).all()  # identical credit
    t1 = transitions.filter(pl.col("task_id") == "t1")
    # rollout-level GRPO on rewards (1, 0, 1): mean 2/3, sample std 0.577..
    by_reward = dict(zip(t1["reward"], t1["advantage"], strict=True))
    assert by_reward[1.0] == pytest.approx((1 - 2 / 3) / (0.5773502691896258 + 1e-6))
    assert by_reward[0.0] == pytest.approx((0 - 2 / 3) / (0.5773502691896258 + 1e-6))
    assert (transitions.filter(pl.col("task_id") == "t2")["advantage"] == 0.0).all()
    assert sorted(set(transitions["agent_name"])) == ["planner", "writer"]
    rollouts = read(result.rollouts_files)
    assert rollouts.height == 6 and rollouts["rollout_id"].is_sorted()


def test_rerun_replaces_the_same_files_byte_for_byte(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = build_transitions(data, out, now=NOW)
    before = {path: path.read_bytes() for path in first.transitions_files + first.rollouts_files}
    second = build_transitions(data, out, now=NOW)
    after = {path: path.read_bytes() for path in second.transitions_files + second.rollouts_files}
    assert before == after
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == sorted(
        p.relative_to(out) for p in before
    )
    transitions = read(sorted(out.rglob("transitions/**/*.parquet")))
    assert transitions.height == 12 and transitions.select("rollout_id", "step_index").is_duplicated().sum() == 0


def test_select_by_agent_keeps_that_agent_only(data: Path, tmp_path: Path) -> None:
    config = parse_config({"select": {"agent": "writer"}})
    result = build_transitions(data, tmp_path / "out", config, now=NOW)
    transitions = read(result.transitions_files)
    assert set(transitions["agent_name"]) == {"writer"} and transitions.height == 6
    assert result.config_hash != config_hash(parse_config(None))


def test_user_stage_from_a_yaml_config(data: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(
        "stages:\n  - drop_failed_rollouts\n  - user_stages_fixture.good:keep_agent: {agent: planner}\n"
        "credit: {method: last_step}\n",
        encoding="utf-8",
    )
    result = build_transitions(data, tmp_path / "out", load_config(config_file), now=NOW)
    transitions = read(result.transitions_files)
    assert set(transitions["agent_name"]) == {"planner"} and transitions.height == 6
    # after the stage, each rollout has one call left, which is its last step
    assert (transitions["credited_reward"] == transitions["reward"]).all()


def test_a_stage_that_drops_a_required_column_is_named(data: Path, tmp_path: Path) -> None:
    config = parse_config({"stages": ["user_stages_fixture.good:drop_reward"]})
    with pytest.raises(StageError, match="drop_reward"):
        build_transitions(data, tmp_path / "out", config, now=NOW)
    assert not (tmp_path / "out").exists()


def test_bad_config_fails_before_any_output(data: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text("credit: {method: no-such-method}\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(PipelineConfigError, match="no-such-method"):
        build_transitions(data, out, load_config(config_file), now=NOW)
    assert not out.exists()


def test_a_build_without_a_reward_keeps_rollouts_and_says_how_to_add_one(tmp_path: Path) -> None:
    write_spans(tmp_path / "data", unrewarded=True)
    kept = build_transitions(tmp_path / "data", tmp_path / "out", now=NOW)
    assert (kept.summary["rollouts"], kept.summary["without_reward"], kept.summary["transitions"]) == (7, 1, 13)
    assert kept.summary["dropped_without_reward"] == 0
    (note,) = kept.notes
    assert note.startswith("1 rollout(s) have no reward") and "reward.function" in note and "pipeline.yaml" in note
    t3 = read(kept.transitions_files).filter(pl.col("task_id") == "t3")
    assert t3.select("reward", "advantage").rows() == [(None, None)]
    dropped = build_transitions(tmp_path / "data", tmp_path / "out", parse_config({"reward": {"missing": "drop"}}))
    assert (dropped.summary["rollouts"], dropped.summary["dropped_without_reward"]) == (6, 1)
    assert "(dropped)" in dropped.notes[0] and "reward.function" in dropped.notes[0]


def test_complete_rollouts_are_built_at_once_and_open_ones_wait(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    root = factory.root(1, 0, 100)  # its root span ended: complete
    factory.llm(1, root, 1, user="done")
    factory.reward(1, root, 99, 1.0)
    # an explicit rollout id without its tracelearn.rollout span: other traces may still join it
    factory.llm(2, None, 1, user="open", rollout_id="episode-2")
    factory.write()
    result = build_transitions(tmp_path / "data", tmp_path / "out", now=at(101))  # default lateness 10 min
    assert (result.summary["rollouts"], result.summary["deferred"], result.summary["transitions"]) == (1, 1, 1)
    later = build_transitions(tmp_path / "data", tmp_path / "out", now=at(1000))
    assert (later.summary["rollouts"], later.summary["deferred"]) == (2, 0)


def test_date_partition_filter(data: Path, tmp_path: Path) -> None:
    assert build_transitions(data, tmp_path / "a", date="2026-11-21", now=NOW).summary["transitions"] == 12
    assert build_transitions(data, tmp_path / "b", date="2026-11-20", now=NOW).summary["transitions"] == 0
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        build_transitions(data, tmp_path / "c", date="21/11/2026", now=NOW)


def test_duckdb_reads_the_transitions_dataset(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_transitions(data, out, now=NOW)
    rows = duckdb.sql(
        f"""
        SELECT agent_name, date, count(*) AS calls, avg(credited_reward) AS mean_reward
        FROM read_parquet('{out}/transitions/*/*.parquet', hive_partitioning = true)
        GROUP BY agent_name, date ORDER BY agent_name
        """
    ).fetchall()
    assert rows == [
        ("planner", dt.date(2026, 11, 21), 6, pytest.approx(3.5 / 6)),
        ("writer", dt.date(2026, 11, 21), 6, pytest.approx(3.5 / 6)),
    ]


def test_process_credit_gives_intermediate_rewards_to_the_call_before_them(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    for trace, final in ((1, 1.0), (2, 0.0)):
        root = factory.root(trace, 0, 100, task_id="t1")
        factory.llm(trace, root, 1, user="t1: plan", task_id="t1", agent="planner")
        factory.reward(trace, root, 2, 0.25, name="step", task_id="t1")  # after the planner call
        factory.llm(trace, root, 3, user="t1: write", task_id="t1", agent="writer")
        factory.reward(trace, root, 99, final, primary=True, task_id="t1")
    factory.write()
    config = parse_config({"credit": {"method": "process"}})
    result = build_transitions(tmp_path / "data", tmp_path / "out", config, now=NOW)
    transitions = read(result.transitions_files).sort("rollout_id", "step_index")
    assert transitions["reward"].to_list() == [1.0, 1.0, 0.0, 0.0]
    assert transitions["credited_reward"].to_list() == [0.25, 1.0, 0.25, 0.0]


def test_a_late_span_reaches_its_rollout_on_the_next_build_and_is_counted(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = build_transitions(data, out, now=NOW)
    assert first.summary["late_span_rollouts"] == 0
    # A tool span of trace 1 lands after that rollout was built (another process, another file).
    late = SpansFactory(data / "spans")
    tool = {sc.GEN_AI_OPERATION_NAME: "execute_tool", sc.GEN_AI_TOOL_NAME: "add", sc.TASK_ID: "t1"}
    late.span(1, "execute_tool add", 50, parent=1, attributes=tool, span_id=1000)
    late.write()

    second = build_transitions(data, out, now=NOW + dt.timedelta(hours=1))
    assert second.summary["late_span_rollouts"] == 1
    rollouts = read(second.rollouts_files)
    assert rollouts.filter(pl.col("n_tool_calls") == 2)["trace_ids"].to_list() == [[f"{1:032x}"]]
    assert read(second.transitions_files).height == 12  # replaced, not duplicated


def test_spans_dates_lists_the_partitions_that_hold_files(data: Path, tmp_path: Path) -> None:
    (data / "spans" / "date=2026-11-20").mkdir()  # an empty partition is not a date to build
    assert spans_dates(data) == ["2026-11-21"] == spans_dates(data / "spans")
    assert spans_dates(tmp_path / "nowhere") == []
