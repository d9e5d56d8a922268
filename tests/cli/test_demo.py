"""The README's demo command, end to end on the embedded defaults: real SmolLM2 served from the registry and
following its production alias, the real agent exporting OTLP to the real collector sidecar, two on-policy
GRPO rounds of the loop (transitions, LoRA training, candidate, paired held-out evaluation, gate, hot swap)."""

import json
import re
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tracelearn.cli.main import main
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.registry import open_registry
from tracelearn.training.loop import RoundState


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 3 minutes on a quiet 2-core machine; a loaded one once took over 10
def test_quick_demo_runs_two_on_policy_rounds(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output

    # 1: the policy was published and served by alias.
    registry = open_registry(tmp_path / "registry")
    first = registry.version("calc-policy", 1)
    assert first.format == "hf" and first.lineage.base_model == "SmolLM2-135M-Instruct"

    # 2: each round collected through the sidecar with the production version of its time, with exact token
    # ids and the tool calls counted, and settled: trained and gated, or said it had no signal.
    production = 1
    for number in (1, 2):
        state = RoundState.load(tmp_path, number)
        assert state.steps["collect"]["production"] == f"calc-policy@{production}", state.steps
        data = state.path / "data"
        stats = spans_stats(data)
        assert stats.rollouts == 24 and stats.rollouts_with_reward == 24  # 6 tasks x 4 samples
        assert stats.token_ids_status == {"server": stats.llm_calls}, "the embedded server returns exact token ids"
        assert "shutdown flushed" in (state.path / "collector.log").read_text()
        rollouts = pl.read_parquet(data / "rollouts" / "**" / "*.parquet")
        assert rollouts["n_llm_calls"].sum() == stats.llm_calls
        assert state.outcome in ("promoted", "not_promoted", "no_signal"), state.outcome
        if state.outcome == "no_signal":
            assert f"round {number}: no_signal: no learning signal" in result.output
            continue
        candidate = registry.resolve(state.steps["publish"]["candidate"])
        assert candidate.format == "lora" and candidate.lineage.parent == f"calc-policy@{production}"
        assert candidate.lineage.extra["trainer"] == "grpo"
        decision = json.loads((state.path / "gate" / "gate.json").read_text())
        assert decision["production"] == f"calc-policy@{production}" and decision["pairs"] == 8
        if decision["promote"]:
            production = candidate.version
    assert registry.aliases("calc-policy")["production"] == production

    # 3: the live server swapped to the last promoted version; the table and the plot.
    assert re.search(rf"answers with calc-policy@{production}\b", result.output), result.output
    assert "the loop, round by round" in result.output and "held-out success: round 0" in result.output
    assert (tmp_path / "loop.png").read_bytes().startswith(b"\x89PNG")
    rows = json.loads((tmp_path / "loop_rounds.json").read_text())
    assert [row["number"] for row in rows] == [0, 1, 2]
