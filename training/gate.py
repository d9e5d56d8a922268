"""The promotion gate: a trained checkpoint becomes ``candidate``, and ``production`` only if it beats it.

Three steps, each usable alone:

- :func:`publish_candidate` publishes a checkpoint directory as the next version of an artifact, with
  its lineage, and moves the ``candidate`` alias to it (the reason in the alias's audit log);
  :func:`publish_run` does so for a training run's checkpoint and ``lineage.json``.
- :func:`decide` is pure: from the candidate's and production's evaluations (same tasks and seeds,
  ``tracelearn.training.evaluate``) it says whether to promote, and why, naming the numbers. The
  candidate must beat production's success rate by more than ``GateConfig.margin`` on the paired
  rollouts and, with ``require_significant``, the paired 95% interval of the difference must lie
  above 0. Without a production version the candidate is promoted.
- :func:`apply_gate` carries a decision out: it promotes the candidate to ``production`` (the reason
  recorded in the audit log) only if production still names the version that was evaluated, and
  otherwise leaves production alone. Either way the decision is returned, to be written as
  ``gate.json`` (:meth:`GateDecision.write`): a refused promotion is recorded there with its reason.

:func:`gate_candidate` runs the whole gate for a published version: both evaluations, the decision,
the alias move, and ``gate.json`` with ``eval.json`` in its working directory. In two steps, as the
train DAG runs it: :func:`evaluate_for_gate` (the evaluations and the decision, written by the caller)
and :func:`apply_decision_file` (the decision carried out and recorded as ``gate.json``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tracelearn.registry import AliasMove, ArtifactNotFoundError, ArtifactVersion, Lineage, Registry, RegistryError
from tracelearn.training.eval_inputs import EvalSpec
from tracelearn.training.eval_results import Comparison, EvalResult, compare, results_table, write_evaluations
from tracelearn.training.eval_serving import REGISTRY_PREFIX
from tracelearn.training.evaluate import evaluate_model

__all__ = [
    "GateConfig",
    "GateConflictError",
    "GateDecision",
    "apply_decision_file",
    "apply_gate",
    "decide",
    "evaluate_for_gate",
    "gate_candidate",
    "publish_candidate",
    "publish_run",
]


class GateConflictError(RegistryError):
    """Production moved (or the candidate differs) since the evaluations the decision rests on; re-run the gate."""


@dataclass(frozen=True)
class GateConfig:
    """``margin``: how far the candidate's success rate must exceed production's, as a fraction (0.05 is
    five percentage points; the default 0.0 asks for strictly better). ``require_significant``: the
    paired 95% interval of the difference must also lie above 0. The two alias names."""

    margin: float = 0.0
    require_significant: bool = False
    candidate_alias: str = "candidate"
    production_alias: str = "production"

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"GateConfig.margin is a fraction of 1 in [0, 1) (0.05 = 5 points), got {self.margin}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate goes to production, why, and the numbers the reason names.

    ``candidate`` / ``production`` are the evaluated versions (``calc-policy@3``, or the model as
    given when it was not a registry version; ``production`` is ``None`` when there was none);
    rates are their success rates on the paired rollouts (on all rollouts without production);
    ``difference`` and ``interval`` are the paired difference and its 95% interval. ``alias_move`` is
    the production move :func:`apply_gate` made (``None`` from :func:`decide`, or when refused).
    """

    promote: bool
    reason: str
    candidate: str
    candidate_model_version: str | None
    production: str | None
    production_model_version: str | None
    candidate_success_rate: float
    production_success_rate: float | None
    difference: float | None
    interval: tuple[float, float] | None
    pairs: int
    config: GateConfig
    alias_move: AliasMove | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "candidate": self.candidate,
            "candidate_model_version": self.candidate_model_version,
            "production": self.production,
            "production_model_version": self.production_model_version,
            "candidate_success_rate": self.candidate_success_rate,
            "production_success_rate": self.production_success_rate,
            "difference": self.difference,
            "interval_95": list(self.interval) if self.interval is not None else None,
            "pairs": self.pairs,
            "config": self.config.to_dict(),
            "alias_move": self.alias_move.to_dict() if self.alias_move is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """A decision written by :meth:`to_dict` (its ``alias_move`` is not restored: apply it again)."""
        interval = data.get("interval_95")
        return cls(
            promote=bool(data["promote"]),
            reason=str(data["reason"]),
            candidate=str(data["candidate"]),
            candidate_model_version=data.get("candidate_model_version"),
            production=data.get("production"),
            production_model_version=data.get("production_model_version"),
            candidate_success_rate=float(data["candidate_success_rate"]),
            production_success_rate=data.get("production_success_rate"),
            difference=data.get("difference"),
            interval=(float(interval[0]), float(interval[1])) if interval else None,
            pairs=int(data["pairs"]),
            config=GateConfig(**data["config"]),
        )

    def write(self, path: Path) -> Path:
        """Write the decision as JSON (``gate.json``); return ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def publish_candidate(registry: Registry, name: str, checkpoint_dir: Path, lineage: Lineage,
                      metadata: Mapping[str, str] | None = None, *, config: GateConfig | None = None,
                      reason: str | None = None) -> ArtifactVersion:
    """Publish ``checkpoint_dir`` as the next checkpoint version of ``name`` and point ``candidate`` at it.

    Publishing identical files again returns the existing version; the alias is moved only if it
    names another version. The default reason names the lineage's training run.
    """
    config = config or GateConfig()
    version = registry.publish("checkpoint", name, checkpoint_dir, lineage=lineage, metadata=metadata).version
    if registry.aliases(name).get(config.candidate_alias) != version.version:
        run = f"training run {lineage.training_run_id}" if lineage.training_run_id else "a training run"
        registry.promote(name, version.version, config.candidate_alias,
                         reason=reason or f"published from {run} ({checkpoint_dir})")
    return version


def publish_run(registry: Registry, name: str, checkpoint_dir: Path, lineage_file: Path, *,
                reason: str | None = None) -> ArtifactVersion:
    """:func:`publish_candidate` for a training run: its checkpoint with the lineage file the run wrote
    (``lineage.json``; an invalid one raises ``InvalidArtifactError`` naming the key)."""
    lineage = Lineage.from_dict(json.loads(lineage_file.read_text(encoding="utf-8")), source=str(lineage_file))
    return publish_candidate(registry, name, checkpoint_dir, lineage, reason=reason)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def decide(candidate: EvalResult, production: EvalResult | None, config: GateConfig | None = None) -> GateDecision:
    """Promote or not, with a reason naming both success rates, the difference and the margin (pure).

    Raises ``ValueError`` (from :func:`~tracelearn.training.evaluate.compare`) when the two
    evaluations used different seeds or success thresholds.
    """
    config = config or GateConfig()
    if production is None:
        low, high = candidate.interval
        return GateDecision(
            promote=True,
            reason=(f"no {config.production_alias} version yet: {candidate.label} goes to {config.production_alias} "
                    f"with success {_percent(candidate.success_rate)} [{_percent(low)}, {_percent(high)}] "
                    f"on {candidate.n} rollouts"),
            candidate=candidate.label,
            candidate_model_version=candidate.model_version,
            production=None,
            production_model_version=None,
            candidate_success_rate=candidate.success_rate,
            production_success_rate=None,
            difference=None,
            interval=None,
            pairs=0,
            config=config,
        )
    comparison = compare(candidate, production)
    promote, reason = _verdict(comparison, config)
    return GateDecision(
        promote=promote,
        reason=reason,
        candidate=candidate.label,
        candidate_model_version=candidate.model_version,
        production=production.label,
        production_model_version=production.model_version,
        candidate_success_rate=comparison.a_rate,
        production_success_rate=comparison.b_rate,
        difference=comparison.difference,
        interval=comparison.interval,
        pairs=comparison.pairs,
        config=config,
    )


def _verdict(comparison: Comparison, config: GateConfig) -> tuple[bool, str]:
    candidate, production = comparison.a.label, comparison.b.label
    if comparison.pairs == 0:
        return False, (f"{candidate} and {production} share no (task, sample) pair: evaluate both on the same "
                       "tasks file and samples")
    low, high = comparison.interval
    numbers = (f"{_percent(comparison.a_rate)} vs {_percent(comparison.b_rate)} on {comparison.pairs} paired "
               f"rollouts, difference {_points(comparison.difference)} points, 95% CI "
               f"[{_points(low)}, {_points(high)}]")
    margin = f"{100 * config.margin:.1f} points"
    if comparison.difference <= config.margin:
        return False, f"{candidate} does not beat {production} by more than the margin of {margin}: {numbers}"
    if config.require_significant and low <= 0.0:
        return False, (f"{candidate} beats {production} by more than the margin of {margin}, but not significantly "
                       f"(the interval reaches 0): {numbers}")
    return True, f"{candidate} beats {production} by more than the margin of {margin}: {numbers}"


def _version_number(label: str, name: str) -> int | None:
    """The version number in ``NAME@N``, ``None`` for a label that is no version of ``name``."""
    artifact, _, number = label.partition("@")
    return int(number) if artifact == name and number.isdigit() else None


def apply_gate(registry: Registry, name: str, candidate_version: int, decision: GateDecision) -> GateDecision:
    """Promote ``name@candidate_version`` to production when ``decision`` says so; return the decision
    with the move made (``alias_move``), or unchanged when production stays.

    Raises :class:`GateConflictError`, moving nothing, when the decision is about another candidate
    version, or production no longer names the version that was evaluated (someone promoted
    meanwhile): the comparison no longer holds.
    """
    evaluated = _version_number(decision.candidate, name)
    if evaluated is not None and evaluated != candidate_version:
        raise GateConflictError(
            f"the decision is about {decision.candidate}, not {name}@{candidate_version}; nothing was promoted"
        )
    alias = decision.config.production_alias
    moves = registry.alias_moves(name, alias)
    current = registry.aliases(name).get(alias)
    expected = _version_number(decision.production, name) if decision.production is not None else None
    if current != expected:
        raise GateConflictError(
            f"{name}@{alias} names version {current} but the decision compared against "
            f"{decision.production or 'no production version'}; re-run the gate. Nothing was promoted"
        )
    if not decision.promote:
        return decision
    move = registry.promote(name, candidate_version, alias, reason=decision.reason,
                            expected_sequence=moves[-1].sequence if moves else 0)
    return dataclasses.replace(decision, alias_move=move)


def evaluate_for_gate(registry: Registry, name: str, candidate_version: int, spec: EvalSpec, workdir: Path,
                      config: GateConfig | None = None, *, console: Console | None = None) -> GateDecision:
    """Evaluate ``name@candidate_version`` and the current production version with ``spec`` (same tasks,
    samples and seed), write ``workdir/eval.json`` and return the decision, not yet applied.

    Each evaluation serves its version with ``tracelearn serve`` (in ``workdir/candidate`` and
    ``workdir/production``). Raises what :func:`~tracelearn.training.evaluate.evaluate_model` raises.
    """
    config = config or GateConfig()
    console = console or Console(stderr=True)
    candidate = evaluate_model(f"{REGISTRY_PREFIX}{name}@{candidate_version}", spec, workdir / "candidate",
                               registry=registry.location, console=console)
    try:
        current = registry.resolve(f"{name}@{config.production_alias}")
    except ArtifactNotFoundError:
        current = None
    production = None
    if current is not None:
        production = evaluate_model(f"{REGISTRY_PREFIX}{current.ref}", spec, workdir / "production",
                                    registry=registry.location, console=console)
    results = [candidate] if production is None else [candidate, production]
    comparison = compare(candidate, production) if production is not None else None
    write_evaluations(workdir, results, comparison)
    console.print(results_table(results, comparison))
    return decide(candidate, production, config)


def apply_decision_file(registry: Registry, name: str, candidate_version: int, decision_path: Path) -> GateDecision:
    """Carry out the decision written at ``decision_path`` (:meth:`GateDecision.write`) with :func:`apply_gate`
    and record it as ``gate.json`` beside it, why included, promoted or not."""
    decision = GateDecision.from_dict(json.loads(decision_path.read_text(encoding="utf-8")))
    applied = apply_gate(registry, name, candidate_version, decision)
    applied.write(decision_path.with_name("gate.json"))
    return applied


def gate_candidate(registry: Registry, name: str, candidate_version: int, spec: EvalSpec, workdir: Path,
                   config: GateConfig | None = None, *, console: Console | None = None) -> GateDecision:
    """The whole gate: :func:`evaluate_for_gate`, then :func:`apply_gate`; writes ``workdir/eval.json`` and
    ``workdir/gate.json``. A failed evaluation promotes nothing.
    """
    console = console or Console(stderr=True)
    decision = evaluate_for_gate(registry, name, candidate_version, spec, workdir, config, console=console)
    decision = apply_gate(registry, name, candidate_version, decision)
    decision.write(workdir / "gate.json")
    console.print(("promoted: " if decision.promote else "not promoted: ") + decision.reason)
    return decision
