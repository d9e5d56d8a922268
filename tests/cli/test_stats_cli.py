"""``tracelearn transitions stats`` and ``tracelearn spans stats --plot``: tables, JSON, PNG, clear errors."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from support.spans_factory import SpansFactory, at

from tracelearn.cli.main import main
from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two tasks x two rollouts (planner and writer calls); t2's rewards are equal (no signal)."""
    root = tmp_path / "data"
    factory = SpansFactory(root / "spans")
    for trace, (task, value) in enumerate([("t1", 1.0), ("t1", 0.0), ("t2", 1.0), ("t2", 1.0)], start=1):
        span = factory.root(trace, 0, 100, task_id=task)
        factory.llm(trace, span, 1, user=f"{task}: plan", task_id=task, agent="planner")
        factory.llm(trace, span, 3, user=f"{task}: write", task_id=task, agent="writer")
        factory.reward(trace, span, 99, value, task_id=task)
    factory.write()
    return root


@pytest.fixture
def out(data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    build_transitions(data, out, now=at(3600))
    return out


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_transitions_stats_prints_tables_and_writes_a_png(out: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    result = invoke("transitions", "stats", str(out), "--plot", str(png))
    assert result.exit_code == 0, result.output
    for title in ("transitions dataset", "rewards per agent", "per task", "GRPO groups (1 without learning signal)"):
        assert title in result.output
    assert "planner" in result.output and "0.707" in result.output  # t1's reward std, sqrt(1/2)
    assert f"wrote {png}" in result.output
    content = png.read_bytes()
    assert content.startswith(PNG_MAGIC) and len(content) > 10_000


def test_transitions_stats_json_on_the_transitions_dir(out: Path) -> None:
    result = invoke("transitions", "stats", str(out / "transitions"), "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["overview"]["transitions"] == 8 and figures["overview"]["rollouts"] == 4
    assert [row["zero_signal"] for row in figures["by_task"]] == [False, True]
    assert {row["agent_name"]: row["reward_mean"] for row in figures["by_agent"]} == {"planner": 0.75, "writer": 0.75}


def test_several_config_hashes_are_listed_until_one_is_chosen(data: Path, out: Path) -> None:
    writer_only = build_transitions(data, out, parse_config({"select": {"agent": "writer"}}), now=at(3600))
    refused = invoke("transitions", "stats", str(out))
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "--config-hash" in refused.output and writer_only.config_hash in refused.output
    chosen = invoke("transitions", "stats", str(out), "--json", "--config-hash", writer_only.config_hash[:10])
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.output)["overview"]["transitions"] == 4
    unknown = invoke("transitions", "stats", str(out), "--config-hash", "ffff0000")
    assert unknown.exit_code != 0 and "'ffff0000' matches no" in unknown.output


def test_errors_are_messages_not_tracebacks(out: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = invoke("transitions", "stats", str(empty))
    assert missing.exit_code == 1 and "no transitions Parquet files" in missing.output

    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    unwritable = invoke("transitions", "stats", str(out), "--plot", str(blocker / "report.png"))
    assert unwritable.exit_code == 1 and "cannot write the plot" in unwritable.output

    newer = tmp_path / "newer" / "transitions" / "date=2026-11-21"
    newer.mkdir(parents=True)
    (path,) = sorted((out / "transitions").rglob("*.parquet"))
    table = pq.read_table(path)
    pq.write_table(
        table.replace_schema_metadata({**table.schema.metadata, SCHEMA_VERSION_KEY: b"99"}), newer / "p.parquet"
    )
    too_new = invoke("transitions", "stats", str(tmp_path / "newer"))
    assert too_new.exit_code == 1 and "newer than this tracelearn reads" in too_new.output
    for result in (missing, unwritable, too_new):
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_spans_stats_adds_agent_and_task_tables_and_a_plot(data: Path, tmp_path: Path) -> None:
    png = tmp_path / "spans.png"
    result = invoke("spans", "stats", str(data), "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert "rewards and latency per agent" in result.output and "per task" in result.output
    assert png.read_bytes().startswith(PNG_MAGIC)
    figures = json.loads(invoke("spans", "stats", str(data), "--json").output)
    assert figures["llm_calls"] == 8
    tasks = {row["task_id"]: row for row in figures["by_task"]}
    assert tasks["t1"]["reward_mean"] == 0.5 and tasks["t2"]["reward_std"] == 0.0
