"""The README's demo command, end to end on the embedded defaults (real SmolLM2, real agent process)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracelearn.cli.main import main
from tracelearn.collector.span_stats import spans_stats


@pytest.mark.slow
def test_quick_demo_serves_the_policy_runs_the_agent_and_shows_the_capture(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "what was captured" in result.output
    stats = spans_stats(tmp_path / "data")
    assert stats.rollouts == 4 and stats.rollouts_with_reward == 4
    assert stats.llm_calls >= 4
    assert stats.token_ids_status == {"server": stats.llm_calls}, "the embedded server returns exact token ids"
    assert stats.services == ["calc-agent"]
    assert json.dumps(stats.to_dict())  # the figures serialize for `spans stats --json`
