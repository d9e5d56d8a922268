"""The winner's way into the registry: published as ``candidate`` with its lineage, then gated like a checkpoint.

:func:`publish_winner` publishes the winning prompt as the next version of the seed prompt's name,
with a lineage that says where it came from (the parent prompt version, the transitions it learned
from, the search's rounds, scores and optimizer tokens) and points the ``candidate`` alias at it.
:func:`gate_published` then applies the gate checkpoints go through (``tracelearn.training.gate``):
the candidate goes to ``production`` only if it beats production's success rate by more than the
margin on paired rollouts, with the paired interval above 0, and only if production still names the
version that was compared. The rollouts it compares are those of the validation tasks, which also
chose the winner (an optimistic estimate: the best of many noisy scores is biased upwards), unless a
held-out gate evaluator is given: then the winner and production are evaluated afresh on its tasks.

May import: tracelearn.registry, tracelearn.training.gate and .eval_results, tracelearn.training.run_dir
(lineage helpers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tracelearn.registry import DEFAULT_ALIAS, ArtifactNotFoundError, ArtifactVersion, Lineage, Registry
from tracelearn.training.apo.candidates import Candidate
from tracelearn.training.apo.evaluation import PromptEvaluator
from tracelearn.training.apo.failures import FailurePool
from tracelearn.training.apo.search import SearchOutcome
from tracelearn.training.eval_results import EvalResult
from tracelearn.training.gate import GateConfig, GateConflictError, GateDecision, apply_gate, decide
from tracelearn.training.run_dir import code_revision, files_snapshot

__all__ = ["GateOutcome", "ancestry", "gate_published", "gate_winner", "publish_winner", "winner_lineage"]


def ancestry(outcome: SearchOutcome, candidate: Candidate) -> list[str]:
    """Candidate ids from the seed down to ``candidate``."""
    by_id = {c.id: c for c in outcome.candidates}
    path = [candidate.id]
    while by_id[path[-1]].parent is not None:
        parent = by_id[path[-1]].parent
        assert parent is not None
        path.append(parent)
    return path[::-1]


def winner_lineage(outcome: SearchOutcome, winner: Candidate, seed_version: ArtifactVersion, pool: FailurePool,
                   run_id: str, extra: Mapping[str, Any]) -> Lineage:
    """Where the winning prompt came from, and what finding it cost (``extra`` adds run details)."""
    assert winner.score is not None and winner.vs_seed is not None and outcome.seed.score is not None
    low, high = winner.vs_seed.interval
    metrics = {
        "success_rate": winner.score.success_rate,
        "seed_success_rate": outcome.seed.score.success_rate,
        "difference": winner.vs_seed.difference,
        "difference_low": low,
        "difference_high": high,
        "validation_rollouts": float(winner.score.n),
        "rounds": float(outcome.rounds_completed),
        "candidates_evaluated": float(sum(c.score is not None for c in outcome.candidates) - 1),
        "rollouts_run": float(outcome.rollouts_run),
        "optimizer_tokens": float(outcome.tokens.total),
        "optimizer_prompt_tokens": float(outcome.tokens.prompt_tokens),
        "optimizer_completion_tokens": float(outcome.tokens.completion_tokens),
    }
    partitions = sorted({part for file in pool.files for part in file.parts if part.startswith("date=")})
    return Lineage(
        dataset=str(pool.root), partitions=tuple(partitions), dataset_snapshot=files_snapshot(pool.files),
        pipeline_config_hash=pool.config_hash, training_run_id=run_id, parent=seed_version.ref, metrics=metrics,
        code_revision=code_revision(),
        extra={"method": "apo", "candidate": winner.id, "path": ancestry(outcome, winner),
               "critique": winner.critique, "tokens_per_round": [r.tokens.total for r in outcome.rounds[1:]],
               "rollouts_per_round": [r.rollouts_run for r in outcome.rounds], **extra},
    )


def publish_winner(registry: Registry, name: str, winner: Candidate, lineage: Lineage, run_id: str,
                   candidate_alias: str = "candidate") -> ArtifactVersion:
    """Publish the winner's prompt as a version of ``name`` and point ``candidate_alias`` at it.

    A prompt identical to an existing version returns that version (its lineage is the one it was
    first published with); the alias moves only if it names another version.
    """
    assert winner.prompt is not None
    version = registry.publish_prompt(name, winner.prompt, lineage=lineage,
                                      metadata={"apo_run": run_id, "apo_candidate": winner.id}).version
    if registry.aliases(name).get(candidate_alias) != version.version:
        registry.promote(name, version.version, candidate_alias,
                         reason=f"APO run {run_id}: {winner.id} beats {lineage.parent} on the validation tasks")
    return version


def gate_winner(registry: Registry, version: ArtifactVersion, winner: EvalResult,
                production: tuple[ArtifactVersion, EvalResult] | None, config: GateConfig) -> GateDecision:
    """Decide on the paired validation rollouts and apply the decision (see the module docstring).

    Raises ``GateConflictError`` when production moved since it was evaluated; nothing is promoted then.
    """
    labelled = dataclasses.replace(winner, registry_version=version.ref)
    against = None
    if production is not None:
        production_version, production_result = production
        against = dataclasses.replace(production_result, registry_version=production_version.ref)
    return apply_gate(registry, version.name, version.version, decide(labelled, against, config))


@dataclass(frozen=True)
class GateOutcome:
    """What the gate did: its decision (``None`` when it could not decide, ``note`` says why), the
    results it compared (candidate first), on which tasks, and the rollouts it ran for that."""

    decision: GateDecision | None
    note: str | None
    results: tuple[EvalResult, ...]
    tasks: str
    rollouts_run: int


def _labelled(result: EvalResult, label: str) -> EvalResult:
    return dataclasses.replace(result, registry_version=label)


def gate_published(registry: Registry, published: ArtifactVersion, winner: Candidate, winner_result: EvalResult,
                   seed_version: ArtifactVersion, seed_result: EvalResult, evaluator: PromptEvaluator,
                   config: GateConfig, held_out: PromptEvaluator | None = None) -> GateOutcome:
    """Gate ``published`` (the winner) against the current production prompt (see the module docstring).

    ``winner_result`` and ``seed_result`` are their validation results; ``evaluator`` scores a production
    version other than the seed on the validation tasks, and ``held_out``, when given, scores both sides
    on its own tasks instead. An agent failure during a gate evaluation decides nothing.
    """
    try:
        production_version, production_text = registry.read_prompt(f"{published.name}@{DEFAULT_ALIAS}")
    except ArtifactNotFoundError:
        production_version, production_text = None, None
    scorer = held_out or evaluator
    tasks = str(scorer.spec.tasks)
    if production_version is not None and production_version.version == published.version:
        return GateOutcome(None, f"{published.ref} is production already", (), tasks, 0)
    rollouts_run = 0
    if held_out is None:
        candidate = winner_result
    else:
        assert winner.prompt is not None
        evaluation = held_out.evaluate(f"gate-{winner.id}", winner.prompt)
        if evaluation.agent_error is not None:
            return GateOutcome(None, f"not gated: the agent failed on {tasks}: {evaluation.agent_error}", (), tasks,
                               evaluation.rollouts_run)
        candidate, rollouts_run = evaluation.result, evaluation.rollouts_run
    production: tuple[ArtifactVersion, EvalResult] | None = None
    if production_version is not None and production_text is not None:
        if held_out is None and production_version.version == seed_version.version:
            production = production_version, seed_result
        else:
            evaluation = scorer.evaluate(f"gate-production-{production_version.version}", production_text)
            rollouts_run += evaluation.rollouts_run
            if evaluation.agent_error is not None:
                return GateOutcome(None, f"not gated: the agent failed on {production_version.ref}: "
                                         f"{evaluation.agent_error}", (), tasks, rollouts_run)
            production = production_version, evaluation.result
    results = (_labelled(candidate, published.ref),) + (
        () if production is None else (_labelled(production[1], production[0].ref),))
    try:
        decision = gate_winner(registry, published, candidate, production, config)
    except GateConflictError as error:
        return GateOutcome(None, str(error), results, tasks, rollouts_run)
    return GateOutcome(decision, None, results, tasks, rollouts_run)
