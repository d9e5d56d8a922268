"""Spans -> rollouts over real spans Parquet files written by the capture path."""

import datetime as dt
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.pipelines.rollouts import (
    RolloutConfig,
    build_closed_rollouts,
    build_rollouts,
    orphan_spans,
    rollouts_to_arrow,
)
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.schemas.dataset import DatasetError, read_table_file
from tracelearn.schemas.identity import task_id_from_messages
from tracelearn.schemas.migrations import SchemaVersionError
from tracelearn.schemas.tables import ROLLOUTS, SCHEMA_VERSION_KEY

LATER = at(3600)  # a build time long after every span in these tests


@pytest.fixture
def factory(tmp_path: Path) -> SpansFactory:
    return SpansFactory(tmp_path / "spans")


def rollouts_of(factory: SpansFactory) -> dict[str, dict[str, Any]]:
    factory.write()
    frame = build_rollouts(scan_spans(factory.directory.parent)).collect()
    return {row["rollout_id"]: row for row in frame.to_dicts()}


def trace_hex(trace: int) -> str:
    return format(trace, "032x")


def test_one_trace_is_one_rollout_with_its_counts(factory: SpansFactory) -> None:
    root = factory.root(1, 0, 10, agent="calc")
    factory.llm(1, root, 1, "2+2?", input_tokens=11, output_tokens=3, agent="calc")
    factory.tool(1, root, 2, status="ERROR", agent="calc")
    factory.llm(1, root, 3, "2+2?", input_tokens=20, output_tokens=4, agent="checker")
    factory.llm(2, factory.root(2, 0, 5), 1, "3+3?")
    factory.root(3, 0, 5)  # a trace where nothing ran (a framework's setup span): no rollout
    rollouts = rollouts_of(factory)
    assert sorted(rollouts) == [trace_hex(1), trace_hex(2)]
    one = rollouts[trace_hex(1)]
    assert one["trace_ids"] == [trace_hex(1)]
    assert one["agents"] == ["calc", "checker"]
    assert one["service_name"] == "calc-agent"
    assert (one["n_spans"], one["n_llm_calls"], one["n_tool_calls"], one["n_errors"]) == (4, 2, 1, 1)
    assert (one["input_tokens"], one["output_tokens"]) == (31, 7)
    assert one["start_time"] == at(0) and one["end_time"] == at(10)
    assert one["status"] == "error", "any span that ended in ERROR fails the rollout, not only the root"
    assert one["error_message"] == "failed" and one["identity"] == "trace"
    assert (rollouts[trace_hex(2)]["status"], rollouts[trace_hex(2)]["error_message"]) == ("ok", None)


def test_explicit_rollout_id_joins_two_traces(factory: SpansFactory) -> None:
    first = factory.root(1, 0, 4, rollout_id="episode-7")
    factory.llm(1, first, 1, "plan", rollout_id="episode-7")
    second = factory.root(2, 5, 9, rollout_id="episode-7")
    factory.llm(2, second, 6, "act", rollout_id="episode-7")
    rollouts = rollouts_of(factory)
    assert list(rollouts) == ["episode-7"]
    assert rollouts["episode-7"]["trace_ids"] == [trace_hex(1), trace_hex(2)]
    assert rollouts["episode-7"]["n_llm_calls"] == 2
    assert rollouts["episode-7"]["end_time"] == at(9)


def test_orphan_span_is_kept_counted_and_marks_a_rootless_rollout_incomplete(factory: SpansFactory) -> None:
    root = factory.root(1, 0, 10)
    factory.llm(1, 999, 1, "lost parent")  # parent 999 never arrived
    factory.llm(2, 998, 1, "only orphans")
    factory.write()
    spans = scan_spans(factory.directory)
    rollouts = {row["rollout_id"]: row for row in build_rollouts(spans).collect().to_dicts()}
    assert rollouts[trace_hex(1)]["n_spans"] == 2 and rollouts[trace_hex(1)]["status"] == "ok"
    assert rollouts[trace_hex(2)]["status"] == "incomplete"
    orphans = orphan_spans(spans).collect()
    assert orphans.get_column("parent_span_id").to_list() == [format(999, "016x"), format(998, "016x")]
    build = build_closed_rollouts(spans, LATER)
    assert build.summary.orphan_spans == 2 and build.summary.incomplete_rollouts == 1
    assert root  # the root span is what keeps trace 1 complete


def test_task_id_explicit_beats_derived_and_same_question_groups(factory: SpansFactory) -> None:
    for trace in (1, 2):
        root = factory.root(trace, 0, 10)
        factory.llm(trace, root, 1, "  What is 6*7?")
        factory.llm(trace, root, 2, "follow-up question")
    root = factory.root(3, 0, 10, task_id="task-42")
    factory.llm(3, root, 1, "What is 6*7?", task_id="task-42")
    rollouts = rollouts_of(factory)
    derived = rollouts[trace_hex(1)]["task_id"]
    assert derived is not None and derived.startswith("msg-")
    assert rollouts[trace_hex(2)]["task_id"] == derived
    expected = task_id_from_messages('[{"role":"user","content":"What is 6*7?"}]')
    assert derived == expected, "the first user message of the earliest LLM call, as capture-side stats hash it"
    assert rollouts[trace_hex(3)]["task_id"] == "task-42"


def test_primary_reward_flagged_beats_first_emitted(factory: SpansFactory) -> None:
    root = factory.root(1, 0, 10)
    factory.reward(1, root, 5, 0.2, name="format")
    factory.reward(1, root, 6, 1.0, name="correct", primary=True)
    root = factory.root(2, 0, 10)
    factory.reward(2, root, 5, 0.3, name="format")
    factory.reward(2, root, 6, 0.9, name="correct")
    rollouts = rollouts_of(factory)
    flagged, unflagged = rollouts[trace_hex(1)], rollouts[trace_hex(2)]
    assert (flagged["final_reward"], flagged["reward_name"]) == (1.0, "correct")
    assert (unflagged["final_reward"], unflagged["reward_name"]) == (0.3, "format")
    assert flagged["rewards"] == [{"key": "correct", "value": 1.0}, {"key": "format", "value": 0.2}]


def test_rollouts_without_reward_are_counted_and_dropped_or_filled(factory: SpansFactory) -> None:
    root = factory.root(1, 0, 10)
    factory.reward(1, root, 9, 1.0)
    factory.llm(2, factory.root(2, 0, 10), 1, "unrewarded")
    factory.write()
    spans = scan_spans(factory.directory)
    kept = build_closed_rollouts(spans, LATER)
    assert (kept.summary.with_reward, kept.summary.without_reward) == (1, 1)
    assert kept.rollouts.height == 2
    dropped = build_closed_rollouts(spans, LATER, RolloutConfig(missing_reward="drop"))
    assert dropped.rollouts.get_column("rollout_id").to_list() == [trace_hex(1)]
    assert dropped.summary.without_reward == 1, "dropped rollouts are still reported"
    filled = build_closed_rollouts(spans, LATER, RolloutConfig(missing_reward="fill", fill_reward=-1.0))
    assert filled.rollouts.get_column("final_reward").to_list() == [1.0, -1.0]
    assert filled.rollouts.get_column("reward_name").to_list() == ["reward", "missing"]


def test_watermark_defers_a_recent_rollout_that_may_grow_and_a_later_build_includes_it(
    factory: SpansFactory,
) -> None:
    factory.llm(1, factory.root(1, 0, 600), 1, "q")  # its root span ended at 12:10: complete, built at once
    # An explicit rollout id without its tracelearn.rollout span: more traces may still join it.
    factory.root(2, 0, 10, rollout_id="episode-2")
    factory.root(3, 0, 600, rollout_id="episode-3")  # ... and its last span ended at 12:10
    factory.write()
    spans = scan_spans(factory.directory)
    config = RolloutConfig(lateness=dt.timedelta(minutes=5))
    early = build_closed_rollouts(spans, at(660), config)  # cutoff 12:06
    assert early.rollouts.get_column("rollout_id").to_list() == [trace_hex(1), "episode-2"]
    assert early.deferred.get_column("rollout_id").to_list() == ["episode-3"]
    assert early.summary.deferred == 1
    later = build_closed_rollouts(spans, at(901), config)  # cutoff just after 12:10
    assert later.rollouts.get_column("rollout_id").to_list() == [trace_hex(1), "episode-2", "episode-3"]
    assert later.summary.deferred == 0
    with pytest.raises(ValueError, match="time zone"):
        build_closed_rollouts(spans, dt.datetime(2026, 11, 21, 13, 0), config)


def test_status_is_error_when_the_root_span_failed(factory: SpansFactory) -> None:
    factory.root(1, 0, 10, status="ERROR")
    factory.llm(2, factory.root(2, 0, 10, status="OK"), 1, "q")
    rollouts = rollouts_of(factory)
    assert rollouts[trace_hex(1)]["status"] == "error"
    assert rollouts[trace_hex(2)]["status"] == "ok"


def test_output_conforms_to_the_rollouts_schema_and_is_deterministic(factory: SpansFactory, tmp_path: Path) -> None:
    for trace in (3, 1, 2):
        root = factory.root(trace, 0, 10, agent="calc")
        factory.llm(trace, root, 1, f"question {trace % 2}")
        factory.reward(trace, root, 9, float(trace), name="score")
    factory.write()
    spans = scan_spans(factory.directory)
    first = build_rollouts(spans).collect()
    table = rollouts_to_arrow(first)
    assert table.schema.equals(ROLLOUTS.schema_with_metadata(), check_metadata=True)
    assert table.column("rollout_id").to_pylist() == [trace_hex(1), trace_hex(2), trace_hex(3)]
    assert table.column("rewards").to_pylist()[0] == [("score", 1.0)]
    pq.write_table(table, tmp_path / "rollouts.parquet")
    assert pq.read_schema(tmp_path / "rollouts.parquet").metadata[SCHEMA_VERSION_KEY] == str(ROLLOUTS.version).encode()
    assert build_rollouts(spans).collect().equals(first)


def test_scan_refuses_a_file_of_a_newer_schema_version(factory: SpansFactory, tmp_path: Path) -> None:
    factory.root(1, 0, 10)
    (written,) = factory.write()
    table = pq.read_table(written)
    newer = table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_VERSION_KEY: b"99"})
    pq.write_table(newer, written)
    with pytest.raises(SchemaVersionError, match=str(written)):
        scan_spans(factory.directory)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no spans"):
        scan_spans(empty)


def test_partition_columns_come_from_the_hive_path(factory: SpansFactory) -> None:
    factory.root(1, 0, 10)
    factory.write()
    frame = scan_spans(factory.directory).select("date", "service").collect()
    assert frame.rows() == [("2026-11-21", "calc-agent")]
    assert frame.schema == pl.Schema({"date": pl.String, "service": pl.String})


def test_a_failed_child_span_fails_the_rollout_and_drop_failed_rollouts_drops_it(tmp_path: Path) -> None:
    factory = SpansFactory(tmp_path / "data" / "spans")
    for trace, agent_status in ((1, "ERROR"), (2, "UNSET")):
        root = factory.root(trace, 0, 10)  # the Agents SDK's trace span ends without an error ...
        agent = factory.span(trace, "Assistant.agent", 1, 9, parent=root, status=agent_status)  # ... its agent's does
        factory.llm(trace, agent, 2, f"question {trace}")
        factory.reward(trace, root, 9.5, 1.0)
    factory.write()
    config = parse_config({"stages": ["drop_failed_rollouts"]})
    built = build_transitions(tmp_path / "data", tmp_path / "out", config, now=LATER)
    statuses = pl.read_parquet(built.rollouts_files).select("rollout_id", "status", "error_message").rows()
    assert statuses == [(trace_hex(1), "error", "failed"), (trace_hex(2), "ok", None)]
    assert pl.read_parquet(built.transitions_files).get_column("rollout_id").to_list() == [trace_hex(2)]
    assert built.summary["error_rollouts"] == 1


def test_rollouts_files_of_schema_version_1_read_with_identity_and_error_message(tmp_path: Path) -> None:
    old = pa.table(
        {"rollout_id": ["r-1", trace_hex(5)], "trace_ids": [[trace_hex(4)], [trace_hex(5)]], "status": ["ok", "error"]}
    )
    path = tmp_path / "rollouts.parquet"
    pq.write_table(old.replace_schema_metadata({SCHEMA_VERSION_KEY: b"1", b"tracelearn.table": b"rollouts"}), path)
    table = read_table_file(path, ROLLOUTS)
    assert table.select(["identity", "error_message"]).to_pylist() == [
        {"identity": "explicit", "error_message": None},
        {"identity": "trace", "error_message": None},
    ]
