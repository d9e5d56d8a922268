"""Dataset analysis over real transitions built from spans: numbers checked by hand, PNGs, DuckDB."""

import statistics
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.pipelines.plots import PlotError, plot_spans, plot_transitions
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.pipelines.stats import (
    ConfigHashError,
    scan_transitions,
    span_analysis,
    transition_distributions,
    transition_stats,
)
from tracelearn.schemas import semconv as sc

NOW = at(3600)
# task -> (reward, writer's answer) per rollout. t2 has no learning signal; t1's writer always answers alike.
ROLLOUTS = {"t1": [(1.0, "4"), (0.0, "4"), (1.0, "4")], "t2": [(0.5, "a"), (0.5, "b"), (0.5, "c")]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def answer(factory: SpansFactory, text: str, token_ids: tuple[list[int], list[int]] | None = None) -> None:
    """Make the last LLM span answer ``text``, with server (prompt, response) ``token_ids`` if given."""
    attributes = factory.records[-1].attributes
    assert isinstance(attributes, dict)
    attributes[f"{sc.GEN_AI_COMPLETION_PREFIX}0.content"] = text
    if token_ids is not None:
        attributes[sc.PROMPT_TOKEN_IDS], attributes[sc.RESPONSE_TOKEN_IDS] = token_ids
        attributes[sc.TOKEN_IDS_STATUS] = sc.TOKEN_IDS_FROM_SERVER


def write_spans(data: Path) -> None:
    """Two tasks x three rollouts: planner (2 prompt / 1 response tokens), writer (4 / 3, or no ids)."""
    factory = SpansFactory(data / "spans")
    trace = 0
    for task, rollouts in ROLLOUTS.items():
        for value, text in rollouts:
            trace += 1
            root = factory.root(trace, 0, 100, task_id=task)
            factory.llm(trace, root, 1, user=f"{task}: plan", task_id=task, agent="planner")
            answer(factory, "plan", ([1, 2], [3]))
            factory.llm(trace, root, 3, user=f"{task}: write", task_id=task, agent="writer", output_tokens=7)
            answer(factory, text, ([1, 2, 3, 4], [5, 6, 7]) if task == "t1" else None)
            factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path]:
    data, out = tmp_path / "data", tmp_path / "out"
    write_spans(data)
    build_transitions(data, out, now=NOW)
    return data, out


def test_reward_and_advantage_per_agent_match_hand_computed_values(built: tuple[Path, Path]) -> None:
    frame, chosen = scan_transitions(built[1])
    stats = transition_stats(frame, chosen)
    rewards = [1.0, 0.0, 1.0, 0.5, 0.5, 0.5]  # each agent makes one call per rollout
    rows = {row["agent_name"]: row for row in stats.by_agent.to_dicts()}
    for agent in ("planner", "writer"):
        assert rows[agent]["transitions"] == 6
        assert rows[agent]["reward_mean"] == pytest.approx(statistics.mean(rewards))
        assert rows[agent]["reward_std"] == pytest.approx(statistics.stdev(rewards))
        assert rows[agent]["credited_reward_mean"] == pytest.approx(statistics.mean(rewards))
        assert rows[agent]["advantage_mean"] == pytest.approx(0.0, abs=1e-9)
    assert rows["planner"]["prompt_tokens_p95"] == 2 and rows["planner"]["response_tokens_mean"] == 1
    # the writer has token ids in t1 only: lengths over those three calls
    assert rows["writer"]["prompt_tokens_mean"] == 4 and rows["writer"]["response_tokens_p50"] == 3
    assert stats.overview.row(0, named=True) == {
        "transitions": 12,
        "rollouts": 6,
        "tasks": 2,
        "agents": 2,
        "config_hashes": 1,
        "without_token_ids": 3,
    }
    assert stats.token_ids.to_dicts() == [
        {"token_ids_source": "(none)", "transitions": 3, "share": 0.25},
        {"token_ids_source": "server", "transitions": 9, "share": 0.75},
    ]


def test_tasks_and_groups_flag_zero_signal_and_exploration_collapse(built: tuple[Path, Path]) -> None:
    stats = transition_stats(*scan_transitions(built[1]))
    assert stats.by_task.to_dicts() == [
        {
            "task_id": "t1",
            "rollouts": 3,
            "transitions": 6,
            "reward_mean": pytest.approx(2 / 3),
            "reward_std": pytest.approx(statistics.stdev([1.0, 0.0, 1.0])),
            "zero_signal": False,
        },
        {"task_id": "t2", "rollouts": 3, "transitions": 6, "reward_mean": 0.5, "reward_std": 0.0, "zero_signal": True},
    ]
    groups = {row["task_id"]: row for row in stats.groups.to_dicts()}
    # t1: "plan" and "4" over six calls; t2: "plan", "a", "b", "c"
    assert groups["t1"]["distinct_responses"] == 2
    assert groups["t1"]["distinct_response_ratio"] == pytest.approx(2 / 6)
    assert groups["t2"]["distinct_response_ratio"] == pytest.approx(4 / 6)
    assert stats.zero_signal_groups == 1
    as_dict = stats.to_dict()
    assert as_dict["config_hash"] == stats.config_hash and len(as_dict["groups"]) == 2


def test_spans_analysis_per_agent_and_task(built: tuple[Path, Path]) -> None:
    analysis = span_analysis(scan_spans(built[0]))
    rows = {row["agent"]: row for row in analysis.by_agent.to_dicts()}
    assert rows["writer"]["llm_calls"] == 6 and rows["writer"]["output_tokens_mean"] == 7
    assert rows["planner"]["reward_mean"] == pytest.approx(3.5 / 6)
    assert rows["planner"]["latency_ms_p50"] == pytest.approx(500.0)  # the factory's spans last 0.5 s
    tasks = {row["task_id"]: row for row in analysis.by_task.to_dicts()}
    assert tasks["t1"]["rollouts"] == 3 and tasks["t1"]["reward_std"] == pytest.approx(statistics.stdev([1, 0, 1]))
    assert tasks["t2"]["reward_std"] == 0.0


def test_plots_are_real_pngs(built: tuple[Path, Path], tmp_path: Path) -> None:
    frame, chosen = scan_transitions(built[1])
    stats = transition_stats(frame, chosen)
    transitions_png = plot_transitions(transition_distributions(frame), stats.groups, tmp_path / "r" / "t.png")
    spans_png = plot_spans(span_analysis(scan_spans(built[0])), tmp_path / "s.png")
    for path in (transitions_png, spans_png):
        content = path.read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000
    with pytest.raises(PlotError, match="cannot write"):
        plot_spans(span_analysis(scan_spans(built[0])), transitions_png / "inside-a-file.png")


def test_several_config_hashes_need_a_choice(built: tuple[Path, Path]) -> None:
    data, out = built
    other = build_transitions(data, out, parse_config({"select": {"agent": "writer"}}), now=NOW)
    with pytest.raises(ConfigHashError, match="choose one with --config-hash"):
        scan_transitions(out)
    frame, chosen = scan_transitions(out / "transitions", other.config_hash[:8])
    assert chosen == other.config_hash
    assert transition_stats(frame, chosen).overview["transitions"].item() == 6
    with pytest.raises(ConfigHashError, match="matches no"):
        scan_transitions(out, "zzzz")


def test_duckdb_polars_and_pyarrow_read_the_datasets(built: tuple[Path, Path]) -> None:
    out = built[1]
    rows = duckdb.sql(
        f"""
        SELECT r.task_id, count(DISTINCT r.rollout_id) AS rollouts, count(*) AS calls, avg(r.final_reward) AS reward
        FROM read_parquet('{out}/transitions/*/*.parquet', hive_partitioning = true) AS t
        JOIN read_parquet('{out}/rollouts/*/*.parquet', hive_partitioning = true) AS r USING (rollout_id, date)
        GROUP BY r.task_id ORDER BY r.task_id
        """
    ).fetchall()
    assert rows == [("t1", 3, 6, pytest.approx(2 / 3)), ("t2", 3, 6, 0.5)]
    assert pl.read_parquet(out / "transitions", hive_partitioning=True).height == 12
    assert ds.dataset(out / "rollouts", format="parquet", partitioning="hive").count_rows() == 6
