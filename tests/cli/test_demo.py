"""The README's demo command, end to end on the embedded defaults: real SmolLM2, a real agent process exporting
OTLP to the real collector sidecar, the real Airflow DAGs under ``dag.test()``."""

import json
import re
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tracelearn.cli.main import main
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.registry import open_registry


@pytest.mark.slow
def test_quick_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output

    # 1-2: the policy was published and served by alias; the agent's calls reached the dataset through the
    # collector sidecar (OTLP/HTTP) with exact token ids.
    registry = open_registry(tmp_path / "registry")
    first = registry.version("calc-policy", 1)
    assert first.format == "hf" and first.lineage.base_model == "SmolLM2-135M-Instruct"
    stats = spans_stats(tmp_path / "data")
    assert stats.rollouts == 16 and stats.rollouts_with_reward == 16  # 8 tasks x 2 samples
    assert stats.token_ids_status == {"server": stats.llm_calls}, "the embedded server returns exact token ids"
    assert stats.services == ["calc-agent"]
    assert json.dumps(stats.to_dict())
    assert re.search(r"collector: \d+ spans acknowledged \(durable\), 0 rejected", result.output), result.output
    assert "shutdown flushed" in (tmp_path / "collector.log").read_text()

    # 3: both DAGs ran: transitions built with the example's reward function, one per LLM call ...
    for task in ("build", "train_torch", "publish_candidate", "evaluate", "gate"):
        assert f"task {task}: success" in result.output, result.output
    transitions = pl.read_parquet(tmp_path / "data" / "transitions" / "**" / "*.parquet")
    assert transitions.height == stats.llm_calls
    assert transitions["token_ids_source"].to_list() == ["server"] * transitions.height
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")

    # ... and a LoRA candidate on the production version, with lineage, evaluated against production on
    # the same held-out tasks and seeds, and a gate decision recorded either way.
    candidate = registry.version("calc-policy", 2)
    assert candidate.format == "lora" and candidate.lineage.base_model == "registry:calc-policy@1"
    assert candidate.lineage.parent == "calc-policy@1" and candidate.lineage.extra["trainer"] == "sft"
    assert registry.aliases("calc-policy")["candidate"] == 2
    (gate_file,) = (tmp_path / "runs").glob("*/gate/gate.json")
    decision = json.loads(gate_file.read_text())
    assert decision["candidate"] == "calc-policy@2" and decision["production"] == "calc-policy@1"
    assert decision["pairs"] == 6
    production = registry.aliases("calc-policy")["production"]
    assert production == (2 if decision["promote"] else 1)

    # 4: the live server follows the alias, and the agent ran again through it on the held-out tasks.
    if decision["promote"]:
        assert "now answers with calc-policy@2+" in result.output  # the live server swapped
    else:
        assert "production did not move" in result.output
    assert spans_stats(tmp_path / "eval" / "live" / "data").rollouts == 6
    assert "after: the live server" in result.output
    assert "held-out success: before" in result.output
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
