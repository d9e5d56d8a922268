"""The ``tracelearn_train`` DAG on the CPU path with ``dag.test()``: train, publish candidate, evaluate, gate.

A tiny model is production in a real registry; the DAG trains GRPO on a transitions dataset, publishes
the candidate with its lineage, evaluates both versions with the real calc agent against
``tracelearn serve``, and gates. The tiny model is random, so both versions score about the same and
a margin of 0.5 (50 points) refuses the promotion: the run records why.
"""

import json
from pathlib import Path

import pytest
from support.airflow_home import run_dag_test
from support.calc_example import CALC_AGENT, CALC_PIPELINE, HELD_OUT
from support.tiny_model import build_tiny_model
from support.transitions_factory import Sample, write_transitions
from transformers import AutoTokenizer

from tracelearn.registry import open_registry

DAG_ID = "tracelearn_train"
# Nothing defaults to the repository's example: the evaluation's agent, tasks and config are params.
CALC_EVALUATION = {"agent": " ".join(CALC_AGENT), "eval_tasks": str(HELD_OUT), "eval_pipeline": str(CALC_PIPELINE)}
LOGICAL_DATE = "2026-11-21T12:00:00+00:00"


@pytest.mark.slow
def test_dag_trains_publishes_a_candidate_evaluates_and_gates(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = []
    for task in range(4):
        question = f"What is {task} plus 1?"
        samples += [Sample(question, str(task + 1), 1.0, 1.0, f"t{task}"),
                    Sample(question, "no", -1.0, 0.0, f"t{task}")]
    write_transitions(tmp_path / "data", tokenizer, samples)
    registry = open_registry(tmp_path / "registry")
    first = registry.publish("checkpoint", "calc-policy", model).version
    registry.promote("calc-policy", first.version, "production", reason="test: initial policy")
    train_config = tmp_path / "train.yaml"
    train_config.write_text("grpo: {learning_rate: 1.0e-3, mini_batch_size: 4}\nruntime: {precision: fp32}\n")

    result = run_dag_test(
        tmp_path / "airflow",
        DAG_ID,
        LOGICAL_DATE,
        conf={"transitions": str(tmp_path / "data"), "registry": str(tmp_path / "registry"),
              "runs": str(tmp_path / "runs"), "train_config": str(train_config), "eval_limit": 2,
              "eval_samples": 1, "margin": 0.5, **CALC_EVALUATION},
        timeout=600,
    )
    assert result.returncode == 0, result.output[-6000:]
    assert result.state == "success"

    versions = registry.versions("calc-policy")
    assert [v.version for v in versions] == [1, 2]
    candidate = versions[1]
    assert registry.aliases("calc-policy")["candidate"] == 2
    assert registry.aliases("calc-policy")["production"] == 1  # refused: no 50-point gain
    assert candidate.lineage.extra["trainer"] == "grpo" and candidate.lineage.pipeline_config_hash
    (gate_file,) = (tmp_path / "runs").rglob("gate.json")
    decision = json.loads(gate_file.read_text())
    assert decision["promote"] is False and "margin" in decision["reason"]
    assert decision["candidate"] == "calc-policy@2" and decision["production"] == "calc-policy@1"
    (evaluations,) = (tmp_path / "runs").rglob("eval.json")
    assert len(json.loads(evaluations.read_text())["evaluations"]) == 2


@pytest.mark.slow
def test_a_bad_train_config_fails_before_training(tmp_path: Path) -> None:
    train_config = tmp_path / "train.yaml"
    train_config.write_text("grpo: {epochs: 0}\n")
    (tmp_path / "data").mkdir()
    result = run_dag_test(tmp_path / "airflow", DAG_ID, LOGICAL_DATE,
                          conf={"transitions": str(tmp_path / "data"), "train_config": str(train_config),
                                "registry": str(tmp_path / "registry"), "runs": str(tmp_path / "runs"),
                                **CALC_EVALUATION})
    assert result.returncode != 0 and result.state == "failed"
    assert "grpo.epochs" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_evaluation_s_agent_tasks_and_config_are_required(tmp_path: Path) -> None:
    """An installed tracelearn has no examples/ to default to: the run fails at validate, saying which."""
    (tmp_path / "data").mkdir()
    result = run_dag_test(tmp_path / "airflow", DAG_ID, LOGICAL_DATE,
                          conf={"transitions": str(tmp_path / "data"), "registry": str(tmp_path / "registry"),
                                "runs": str(tmp_path / "runs"), "eval_tasks": str(HELD_OUT)})
    assert result.returncode != 0 and result.state == "failed"
    assert "params agent, eval_pipeline are required" in result.output
