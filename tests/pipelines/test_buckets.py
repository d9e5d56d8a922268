"""Bounded-memory builds: a dataset cut into buckets builds the same rows as one piece."""

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.buckets import assign_buckets, bucket_columns, rollout_group_keys
from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.pipelines.spans_input import scan_spans

NOW = at(3600)
TASKS = 12
ROLLOUTS_PER_TASK = 4


def write_spans(data: Path) -> None:
    """12 tasks x 4 rollouts; half the tasks carry an explicit task id, half derive it from the prompt."""
    factory = SpansFactory(data / "spans")
    trace = 0
    for task in range(TASKS):
        identity = {"task_id": f"t{task}"} if task % 2 == 0 else {}
        for attempt in range(ROLLOUTS_PER_TASK):
            trace += 1
            root = factory.root(trace, 0, 100, **identity)
            factory.llm(trace, root, 1, user=f"task {task}: plan", agent="planner", **identity)
            factory.tool(trace, root, 2, **identity)
            factory.llm(trace, root, 3, user=f"task {task}: write", agent="writer", **identity)
            factory.reward(trace, root, 99, float((task + attempt) % 3) / 2, **identity)
    factory.write()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_spans(root)
    return root


def read(files: list[Path]) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(path) for path in files]).sort("rollout_id", "step_index")


def test_a_bucketed_build_writes_the_same_transitions_as_one_piece(data: Path, tmp_path: Path) -> None:
    whole = build_transitions(data, tmp_path / "whole", now=NOW)
    cut = build_transitions(data, tmp_path / "cut", now=NOW, bucket_bytes=2_000)

    assert whole.summary["buckets"] == 1 and cut.summary["buckets"] > 3
    assert {k: v for k, v in cut.summary.items() if k != "buckets"} == {
        k: v for k, v in whole.summary.items() if k != "buckets"
    }
    assert whole.summary["groups"] == TASKS and whole.summary["transitions"] == TASKS * ROLLOUTS_PER_TASK * 2
    # Same rows, same advantages (up to summation order): every GRPO group was built inside one bucket.
    assert_frame_equal(read(cut.transitions_files), read(whole.transitions_files), check_exact=False)
    rollouts = pl.concat([pl.read_parquet(path) for path in cut.rollouts_files])
    assert rollouts["rollout_id"].is_sorted() and rollouts.height == TASKS * ROLLOUTS_PER_TASK
    assert not list((tmp_path / "cut").glob(".build-*")), "the spilled buckets are removed"


def test_a_bucketed_rerun_is_byte_identical(data: Path, tmp_path: Path) -> None:
    first = build_transitions(data, tmp_path / "out", now=NOW, bucket_bytes=2_000)
    before = {path: path.read_bytes() for path in first.transitions_files + first.rollouts_files}
    second = build_transitions(data, tmp_path / "out", now=NOW, bucket_bytes=2_000)
    assert {path: path.read_bytes() for path in second.transitions_files + second.rollouts_files} == before


def test_group_keys_match_the_rollouts_task_ids(data: Path, tmp_path: Path) -> None:
    result = build_transitions(data, tmp_path / "out", now=NOW)
    built = pl.concat([pl.read_parquet(path) for path in result.rollouts_files]).select("rollout_id", "task_id")
    keys = rollout_group_keys(scan_spans(data), ["task_id"]).collect().sort("rollout_id")
    assert keys.equals(built.sort("rollout_id"))


def test_rollouts_of_one_group_share_a_bucket(data: Path) -> None:
    keys = rollout_group_keys(scan_spans(data), ["task_id"]).collect()
    buckets = assign_buckets(keys, ["task_id"], 5).join(keys, on="rollout_id")
    per_task = buckets.group_by("task_id").agg(pl.col("__bucket").n_unique().alias("buckets"))
    assert per_task["buckets"].max() == 1 and buckets["__bucket"].n_unique() > 1
    # stable: the same keys give the same buckets
    assert assign_buckets(keys.reverse(), ["task_id"], 5).equals(assign_buckets(keys, ["task_id"], 5))


def test_a_group_key_without_rollout_level_columns_builds_in_one_piece(data: Path, tmp_path: Path) -> None:
    assert bucket_columns(["agent_name"]) == [] and bucket_columns(["task_id", "agent_name"]) == ["task_id"]
    config = parse_config({"advantage": {"group_by": ["agent_name"]}})
    result = build_transitions(data, tmp_path / "out", config, now=NOW, bucket_bytes=2_000)
    assert result.summary["buckets"] == 1 and result.summary["groups"] == 2


def test_a_failing_bucket_leaves_the_previous_output(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = build_transitions(data, out, now=NOW, bucket_bytes=2_000)
    before = {path: path.read_bytes() for path in first.transitions_files}
    config = parse_config({"stages": ["user_stages_fixture.good:drop_reward"]})
    with pytest.raises(ValueError, match="drop_reward"):
        build_transitions(data, out, config, now=NOW, bucket_bytes=2_000)
    assert {path: path.read_bytes() for path in first.transitions_files} == before
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no temp files or spill left behind"
