"""The README's demo command, end to end on the embedded defaults (real SmolLM2, real agent process)."""

import json
import re
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tracelearn.cli.main import main
from tracelearn.collector.span_stats import spans_stats
from tracelearn.registry import open_registry


@pytest.mark.slow
def test_quick_demo_serves_the_policy_runs_the_agent_and_builds_transitions(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "what was captured" in result.output
    policy = open_registry(tmp_path / "registry").resolve("calc-policy@production")
    assert policy.version == 1 and policy.format == "gguf"
    stats = spans_stats(tmp_path / "data")
    assert stats.rollouts == 4 and stats.rollouts_with_reward == 4
    assert stats.llm_calls >= 4
    assert stats.token_ids_status == {"server": stats.llm_calls}, "the embedded server returns exact token ids"
    assert stats.services == ["calc-agent"]
    assert json.dumps(stats.to_dict())  # the figures serialize for `spans stats --json`

    # Steps 4 and 5: the example pipeline's reward function re-scored every rollout from the gold
    # answer the agent recorded, and the transitions' statistics and report were written.
    assert "spans -> transitions" in result.output and "what the transitions say" in result.output
    assert re.search(r"rollouts rewarded by the function\s*│\s*4\b", result.output), result.output
    rollouts = pl.read_parquet(tmp_path / "data" / "rollouts" / "**" / "*.parquet")
    assert rollouts.height == 4 and rollouts["reward_name"].to_list() == ["correct"] * 4
    transitions = pl.read_parquet(tmp_path / "data" / "transitions" / "**" / "*.parquet")
    assert transitions.height == stats.llm_calls and transitions["reward"].is_not_null().all()
    assert transitions["token_ids_source"].to_list() == ["server"] * transitions.height
    report = tmp_path / "report.png"
    assert "report.png" in result.output  # its path, however rich wraps it
    assert report.read_bytes().startswith(b"\x89PNG")
