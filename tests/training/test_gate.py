"""The promotion gate: decisions from evaluations, and their effect on a real filesystem registry's aliases."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from rich.console import Console
from support.calc_example import HELD_OUT, calc_spec
from support.checkpoints import write_hf_checkpoint
from support.tiny_model import build_tiny_model

from tracelearn.registry import Lineage
from tracelearn.registry.filesystem import FilesystemRegistry
from tracelearn.training.eval_results import EvalResult
from tracelearn.training.gate import (
    GateConfig,
    GateConflictError,
    apply_gate,
    decide,
    gate_candidate,
    publish_candidate,
)

NAME = "calc-policy"


def made_result(label: str, successes: list[bool], *, seed: int = 0) -> EvalResult:
    """An evaluation of ``label`` whose rollouts (one per task) succeed as ``successes`` says."""
    frame = pl.DataFrame(
        {"task_id": [f"t{i}" for i in range(len(successes))], "sample": [0] * len(successes),
         "rollout_id": [f"{label}-{i}" for i in range(len(successes))], "status": ["ok"] * len(successes),
         "reward": [float(ok) for ok in successes], "success": successes},
        schema={"task_id": pl.String, "sample": pl.Int64, "rollout_id": pl.String, "status": pl.String,
                "reward": pl.Float64, "success": pl.Boolean},
    )
    return EvalResult(model=f"registry:{label}", registry_version=label, served_model=label,
                      model_version=f"{label}+0123456789ab", base_url="http://127.0.0.1:1/v1",
                      spec=calc_spec(seed=seed, samples=1), agent_command=(), tasks=len(successes), rollouts=frame,
                      unmatched_rollouts=0, pipeline_config_hash="0" * 64, data_dir=Path("data"), wall_time_s=1.0)


def rate(successes: int, n: int = 40) -> list[bool]:
    return [True] * successes + [False] * (n - successes)


# --- decide (pure) ----------------------------------------------------------------------------------


def test_a_candidate_that_beats_production_by_the_margin_is_promoted() -> None:
    decision = decide(made_result(f"{NAME}@2", rate(25)), made_result(f"{NAME}@1", rate(20)), GateConfig(margin=0.05))

    assert decision.promote
    assert decision.reason.startswith(f"{NAME}@2 beats {NAME}@1 by more than the margin of 5.0 points")
    assert "62.5% vs 50.0% on 40 paired rollouts, difference +12.5 points" in decision.reason
    assert (decision.candidate_success_rate, decision.production_success_rate) == (0.625, 0.5)
    assert decision.difference == pytest.approx(0.125) and decision.pairs == 40


def test_a_candidate_within_the_margin_stays_a_candidate_and_the_reason_names_both_rates() -> None:
    decision = decide(made_result(f"{NAME}@2", rate(21)), made_result(f"{NAME}@1", rate(20)), GateConfig(margin=0.05))

    assert not decision.promote
    assert decision.reason.startswith(f"{NAME}@2 does not beat {NAME}@1 by more than the margin of 5.0 points")
    assert "52.5% vs 50.0%" in decision.reason and "+2.5 points" in decision.reason
    # Equal rates never promote, even with no margin: the candidate must be strictly better.
    assert not decide(made_result(f"{NAME}@2", rate(20)), made_result(f"{NAME}@1", rate(20))).promote


def test_require_significant_needs_the_paired_interval_above_zero() -> None:
    small_win = (made_result(f"{NAME}@2", rate(23)), made_result(f"{NAME}@1", rate(20)))
    assert decide(*small_win).promote
    refused = decide(*small_win, GateConfig(require_significant=True))
    assert not refused.promote and refused.interval is not None and refused.interval[0] <= 0
    assert "but not significantly (the interval reaches 0)" in refused.reason

    clear_win = decide(made_result(f"{NAME}@2", rate(36)), made_result(f"{NAME}@1", rate(20)),
                       GateConfig(require_significant=True))
    assert clear_win.promote and clear_win.interval is not None and clear_win.interval[0] > 0


def test_without_production_the_candidate_is_promoted_and_the_reason_says_so() -> None:
    decision = decide(made_result(f"{NAME}@1", rate(10)), None)

    assert decision.promote and decision.production is None
    assert decision.reason.startswith(f"no production version yet: {NAME}@1 goes to production with success 25.0%")


def test_evaluations_with_different_seeds_cannot_be_gated() -> None:
    with pytest.raises(ValueError, match="seed 0 and 3"):
        decide(made_result(f"{NAME}@2", rate(30)), made_result(f"{NAME}@1", rate(20), seed=3))


# --- publish and apply with a real registry -----------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> FilesystemRegistry:
    return FilesystemRegistry(tmp_path / "registry")


def test_a_checkpoint_is_published_as_candidate_with_its_lineage(registry: FilesystemRegistry, tmp_path: Path) -> None:
    lineage = Lineage(dataset="/data/transitions", pipeline_config_hash="abc123", training_run_id="run-43",
                      parent=f"{NAME}@1", metrics={"train_loss_final": 0.5})

    version = publish_candidate(registry, NAME, write_hf_checkpoint(tmp_path / "ckpt"), lineage, {"task": "calc"})

    assert version.ref == f"{NAME}@1" and registry.aliases(NAME) == {"candidate": 1, "latest": 1}
    stored = registry.resolve(f"{NAME}@candidate")
    assert stored.lineage == lineage and stored.metadata == {"task": "calc"}
    (move,) = registry.alias_moves(NAME, "candidate")
    assert move.reason.startswith("published from training run run-43")
    # Publishing the same files again changes nothing: same version, no second alias move.
    assert publish_candidate(registry, NAME, tmp_path / "ckpt", lineage) == version
    assert len(registry.alias_moves(NAME, "candidate")) == 1


def test_the_gate_promotes_or_refuses_and_records_why(registry: FilesystemRegistry, tmp_path: Path) -> None:
    first = publish_candidate(registry, NAME, write_hf_checkpoint(tmp_path / "a", seed=1), Lineage(training_run_id="1"))
    promoted = apply_gate(registry, NAME, first.version, decide(made_result(f"{NAME}@1", rate(10)), None))
    assert promoted.alias_move is not None and promoted.alias_move.version == 1
    assert registry.aliases(NAME)["production"] == 1

    second = publish_candidate(registry, NAME, write_hf_checkpoint(tmp_path / "b", seed=2),
                               Lineage(training_run_id="2", parent=f"{NAME}@1"))
    worse = decide(made_result(f"{NAME}@2", rate(9)), made_result(f"{NAME}@1", rate(10)))
    refused = apply_gate(registry, NAME, second.version, worse)
    assert not refused.promote and refused.alias_move is None
    assert registry.aliases(NAME) == {"candidate": 2, "production": 1, "latest": 2}
    gate_json = json.loads(refused.write(tmp_path / "run" / "gate.json").read_text())
    assert gate_json["promote"] is False and gate_json["reason"] == worse.reason
    assert gate_json["candidate"] == f"{NAME}@2" and gate_json["production"] == f"{NAME}@1"

    better = decide(made_result(f"{NAME}@2", rate(30)), made_result(f"{NAME}@1", rate(10)))
    applied = apply_gate(registry, NAME, second.version, better)
    assert registry.aliases(NAME)["production"] == 2
    moves = registry.alias_moves(NAME, "production")
    assert [(m.version, m.previous) for m in moves] == [(1, None), (2, 1)]
    assert moves[0].reason.startswith("no production version yet") and moves[1].reason == better.reason
    assert applied.to_dict()["alias_move"]["version"] == 2


def test_a_decision_that_no_longer_holds_moves_nothing(registry: FilesystemRegistry, tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        publish_candidate(registry, NAME, write_hf_checkpoint(tmp_path / f"c{seed}", seed=seed), Lineage())
    registry.promote(NAME, 2, "production", reason="someone else promoted 2")
    stale = decide(made_result(f"{NAME}@3", rate(30)), made_result(f"{NAME}@1", rate(10)))

    with pytest.raises(GateConflictError, match=r"production names version 2 but the decision compared against "
                                                rf"{NAME}@1; re-run the gate"):
        apply_gate(registry, NAME, 3, stale)
    with pytest.raises(GateConflictError, match=rf"the decision is about {NAME}@3, not {NAME}@2"):
        apply_gate(registry, NAME, 2, stale)
    assert registry.aliases(NAME)["production"] == 2 and len(registry.alias_moves(NAME, "production")) == 1


# --- the whole gate ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_gate_candidate_evaluates_both_versions_on_the_same_tasks_and_applies_the_decision(
    registry: FilesystemRegistry, tmp_path: Path
) -> None:
    production = publish_candidate(registry, NAME, build_tiny_model(tmp_path / "p", seed=0), Lineage())
    registry.promote(NAME, production.version, "production", reason="initial policy")
    candidate = publish_candidate(registry, NAME, build_tiny_model(tmp_path / "c", seed=1),
                                  Lineage(training_run_id="run-44", parent=production.ref))
    spec = calc_spec(tasks=HELD_OUT, limit=2, samples=1, seed=3)

    decision = gate_candidate(registry, NAME, candidate.version, spec, tmp_path / "gate",
                              console=Console(file=io.StringIO()))

    assert (decision.candidate, decision.production) == (f"{NAME}@2", f"{NAME}@1")
    assert decision.candidate_model_version is not None and decision.candidate_model_version.startswith(f"{NAME}@2+")
    assert decision.production_model_version is not None and decision.production_model_version.startswith(f"{NAME}@1+")
    assert decision.pairs == 2
    assert registry.aliases(NAME)["production"] == (2 if decision.promote else 1)
    assert json.loads((tmp_path / "gate" / "gate.json").read_text()) == json.loads(json.dumps(decision.to_dict()))
    evaluations = json.loads((tmp_path / "gate" / "eval.json").read_text())
    assert [e["registry_version"] for e in evaluations["evaluations"]] == [f"{NAME}@2", f"{NAME}@1"]
    assert [e["spec"]["seed"] for e in evaluations["evaluations"]] == [3, 3]
    assert evaluations["comparison"]["pairs"] == 2
