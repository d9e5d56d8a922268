"""The ``tracelearn_apo`` DAG with ``dag.test()``: validate, then optimize (search, publish candidate, gate).

The scripted policy and optimizer are real HTTP servers in this process; Airflow runs in a subprocess
(``support.airflow_home``) whose tasks run the calc agent under opentelemetry-instrument against them.
The optimizer's edit adds the word the policy needs, so the candidate wins and the gate promotes it.
"""

import json
import sys
from pathlib import Path

import pytest
from support.airflow_home import run_dag_test
from support.calc_example import CALC_AGENT, CALC_PIPELINE, calc_spec
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.registry import open_registry
from tracelearn.training.evaluate import evaluate_model

# The policy and optimizer scripts live beside the APO tests; import them the way pytest imports those
# tests (their folder on sys.path), since "training" names the library's own folder at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "apo"))
from apo_fixtures import (
    EXACT_PROMPT,
    SEED_PROMPT,
    TRAIN_TASKS,
    VAL_TASKS,
    OptimizerScript,
    policy_script,
    prompt_block,
    quiet,
)

DAG_ID = "tracelearn_apo"
LOGICAL_DATE = "2026-11-21T12:00:00+00:00"


def _conf(tmp_path: Path, transitions: Path, policy: ScriptedLLMServer, optimizer: ScriptedLLMServer) -> dict:
    return {"transitions": str(transitions), "registry": str(tmp_path / "registry"), "runs": str(tmp_path / "runs"),
            "tasks": str(VAL_TASKS), "agent": " ".join(CALC_AGENT), "pipeline": str(CALC_PIPELINE), "limit": 3,
            "policy_url": policy.base_url, "optimizer_url": optimizer.base_url,
            "rounds": 1, "beam": 1, "branch": 1}


@pytest.mark.slow
def test_dag_optimizes_publishes_a_candidate_and_gates_it(tmp_path: Path) -> None:
    registry = open_registry(tmp_path / "registry")
    seed = registry.publish_prompt("calc-system", SEED_PROMPT).version
    registry.promote("calc-system", seed.version, "production", reason="test: the agent's prompt")
    with ScriptedLLMServer(policy_script) as policy, \
            ScriptedLLMServer(OptimizerScript([prompt_block(EXACT_PROMPT)]), model="optimizer") as optimizer:
        collected = evaluate_model(policy.model, calc_spec(tasks=TRAIN_TASKS, limit=3, samples=1), tmp_path / "collect",
                                   base_url=policy.base_url, console=quiet())
        result = run_dag_test(tmp_path / "airflow", DAG_ID, LOGICAL_DATE,
                              conf=_conf(tmp_path, collected.data_dir, policy, optimizer), timeout=600)

    assert result.returncode == 0, result.output[-6000:]
    assert result.state == "success"
    assert registry.read_prompt("calc-system@candidate")[1] == EXACT_PROMPT
    assert registry.aliases("calc-system")["production"] == 2
    version = registry.version("calc-system", 2)
    assert version.lineage.parent == "calc-system@1" and version.lineage.extra["path"] == ["seed", "r1.1"]
    (summary_file,) = (tmp_path / "runs").rglob("summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["winner"]["candidate"] == "r1.1" and summary["gate"]["decision"]["promote"] is True
    assert (summary_file.parent / "tree.json").exists() and (summary_file.parent / "gate.json").exists()


@pytest.mark.slow
def test_dag_skips_when_the_transitions_hold_no_failure(tmp_path: Path) -> None:
    registry = open_registry(tmp_path / "registry")
    registry.publish_prompt("calc-system", SEED_PROMPT)
    registry.promote("calc-system", 1, "production")
    with ScriptedLLMServer() as right, ScriptedLLMServer(OptimizerScript([""]), model="optimizer") as optimizer:
        collected = evaluate_model(right.model, calc_spec(tasks=TRAIN_TASKS, limit=2, samples=1), tmp_path / "collect",
                                   base_url=right.base_url, console=quiet())
        result = run_dag_test(tmp_path / "airflow", DAG_ID, LOGICAL_DATE,
                              conf=_conf(tmp_path, collected.data_dir, right, optimizer), timeout=300)
        assert optimizer.chat_requests() == []

    assert result.state == "success", result.output[-4000:]
    assert "nothing to optimize: 0 of 2 rollouts" in result.output
    assert [v.version for v in registry.versions("calc-system")] == [1]
    assert not (tmp_path / "runs").exists()
