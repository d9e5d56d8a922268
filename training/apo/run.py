"""One APO run end to end: inputs checked, the policy and optimizer reached, the search, the winner gated.

:func:`run_apo` is what ``tracelearn apo run`` and the ``tracelearn_apo`` DAG call:

1. **Inputs** (:func:`check_inputs`), before anything starts: the seed prompt (a registry
   reference; its braces must be template syntax, and a prompt with template variables needs the
   ``registry`` injection, since the gateway puts a prompt in verbatim), the transitions and their
   failures (none: :class:`~tracelearn.training.apo.failures.NoFailuresError`, and nothing is
   written), the tasks files, the pipeline config, the rollout budget (it must cover one
   evaluation), the optimizer endpoint and model, the policy, and the run directory (a different
   configuration in it is refused unless ``restart``).
2. **Policy**: the server the agent's calls go to: ``policy_url`` (default ``$OPENAI_BASE_URL``, else
   the calc agent's default http://127.0.0.1:8000/v1), or ``policy_model`` started with ``tracelearn
   serve`` for the run.
3. **Search**: :func:`~tracelearn.training.apo.search.beam_search`, with the optimizer's calls traced
   into ``<out>/optimizer-spans`` and candidates evaluated by real rollouts (``evaluation``).
4. **Outcome**: with a winner, it is published to the registry as a ``candidate`` version with its
   lineage and gated against production (``promotion``; ``gate.json``), on the validation rollouts
   or, with ``gate_tasks``, on held-out tasks; without one, the run says the seed prompt stands and
   the registry is left alone. ``summary.json``, ``best_prompt.txt`` and ``eval/`` are written
   either way (see ``run_files``).

A run whose search is complete costs nothing to run again: every round is on disk and every
evaluation in the cache, so it goes straight to publishing (the same version again) and the gate.
Unless the gate promoted its winner: then ``--prompt NAME@production`` names another seed, and the
run directory refuses it as another configuration.

May import: tracelearn.training.apo, tracelearn.training.evaluate and its eval_* parts, tracelearn.registry, rich.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tracelearn.registry import DEFAULT_ALIAS, ArtifactNotFoundError, ArtifactVersion, Registry, open_registry
from tracelearn.training.apo.candidates import Candidate
from tracelearn.training.apo.evaluation import INJECTIONS, PromptEvaluator
from tracelearn.training.apo.failures import FailurePool, load_failures
from tracelearn.training.apo.optimizer import OptimizerModel, resolve_optimizer_model
from tracelearn.training.apo.optimizer_spans import OptimizerSpans
from tracelearn.training.apo.promotion import GateOutcome, gate_published, publish_winner, winner_lineage
from tracelearn.training.apo.run_files import RunFiles, write_json_atomically
from tracelearn.training.apo.search import SearchOutcome, SearchSettings, beam_search
from tracelearn.training.apo.templates import template_variables
from tracelearn.training.eval_inputs import EvalSpec, UnknownModelError, eval_pipeline_config, read_task_ids
from tracelearn.training.eval_results import EvalResult, compare, results_table, write_evaluations
from tracelearn.training.eval_serving import ServedModel, model_cards, pinned_model, served_model
from tracelearn.training.gate import GateConfig, GateDecision

__all__ = ["DEFAULT_POLICY_URL", "ApoConfig", "ApoInputs", "ApoResult", "InjectionError",
           "check_inputs", "run_apo"]

DEFAULT_POLICY_URL = "http://127.0.0.1:8000/v1"  # where the calc agent's calls go when nothing says otherwise


class InjectionError(ValueError):
    """The seed prompt cannot reach the agent the chosen way (template variables through the gateway)."""


@dataclass(frozen=True)
class ApoConfig:
    """Everything one APO run needs (see :func:`run_apo`; the CLI's flags map onto these fields).

    The agent runs on the policy at ``policy_url`` (``policy_name``: which model of that server, by
    default its only one) or on ``policy_model`` served for the run; with neither, at
    ``$OPENAI_BASE_URL`` or :data:`DEFAULT_POLICY_URL`. ``spec`` gives the validation tasks, samples,
    seed (also the seed of failure sampling), agent and reward; ``search`` the shape and budgets;
    ``injection`` how a candidate reaches the agent (``evaluation.INJECTIONS``); ``gate_tasks``
    held-out tasks for the gate (default: the validation rollouts). Rollouts of the transitions with a
    reward below ``failure_threshold`` (default: the spec's success threshold) are the failures the
    optimizer sees.
    """

    prompt: str
    transitions: Path
    optimizer_url: str
    out: Path
    spec: EvalSpec
    search: SearchSettings = field(default_factory=SearchSettings)
    policy_url: str | None = None
    policy_name: str | None = None
    policy_model: str | None = None
    injection: str = "gateway"
    optimizer_name: str | None = None
    optimizer_api_key: str = "not-needed"
    optimizer_temperature: float = 0.7
    optimizer_max_tokens: int = 512
    failure_threshold: float | None = None
    config_hash: str | None = None
    registry: str | None = None
    cache: Path | None = None
    gate_tasks: Path | None = None
    margin: float = 0.0
    restart: bool = False

    def __post_init__(self) -> None:
        if self.policy_url is not None and self.policy_model is not None:
            raise ValueError("say which model the agent runs on: --policy-url URL (a running OpenAI-compatible "
                             "server) or --policy MODEL (served for the run with tracelearn serve), not both")
        if self.policy_name is not None and self.policy_model is not None:
            raise ValueError("--policy-name picks a model of the server at --policy-url, not of --policy")
        if self.injection not in INJECTIONS:
            raise ValueError(f"--inject {self.injection!r}: use one of {', '.join(INJECTIONS)}")
        if self.spec.seed != self.search.seed:
            raise ValueError(f"ApoConfig: the spec's seed ({self.spec.seed}) and the search's ({self.search.seed}) "
                             "must be the same seed")
        if self.optimizer_max_tokens < 1:
            raise ValueError(f"--optimizer-max-tokens must be at least 1, got {self.optimizer_max_tokens}")

    @property
    def threshold(self) -> float:
        return self.spec.success_threshold if self.failure_threshold is None else self.failure_threshold

    @property
    def policy_endpoint(self) -> str | None:
        """The running server the agent calls, ``None`` when ``policy_model`` is served for the run."""
        if self.policy_model is not None:
            return None
        return self.policy_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_POLICY_URL

    @property
    def gate_spec(self) -> EvalSpec | None:
        """The spec of the held-out gate: the validation spec on ``gate_tasks`` (all of them)."""
        return None if self.gate_tasks is None else dataclasses.replace(self.spec, tasks=self.gate_tasks, limit=None)


@dataclass(frozen=True)
class ApoInputs:
    """The checked inputs of a run (:func:`check_inputs`): what the search starts from."""

    registry: Registry
    seed_version: ArtifactVersion
    seed_text: str
    pool: FailurePool
    optimizer_model: str
    policy: str
    tasks: int

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for a DAG's XCom and a log line."""
        return {"prompt": self.seed_version.ref, "failures": len(self.pool.failures),
                "rollouts": self.pool.rollouts, "transitions_config_hash": self.pool.config_hash,
                "optimizer_model": self.optimizer_model, "policy": self.policy, "tasks": self.tasks}


@dataclass(frozen=True)
class ApoResult:
    """What a run produced: the search outcome, the published version and the gate's decision (or why not)."""

    outcome: SearchOutcome
    seed_version: ArtifactVersion
    published: ArtifactVersion | None
    gate: GateOutcome | None
    summary: dict[str, Any]
    files: RunFiles

    @property
    def decision(self) -> GateDecision | None:
        return None if self.gate is None else self.gate.decision


# --- Inputs -----------------------------------------------------------------------------------------


def _seed_prompt(registry: Registry, reference: str, injection: str) -> tuple[ArtifactVersion, str]:
    try:
        version, text = registry.read_prompt(reference, default_alias=DEFAULT_ALIAS)
    except ArtifactNotFoundError as error:
        raise ArtifactNotFoundError(
            f"--prompt {reference}: {error}. Publish the agent's system prompt first, e.g. tracelearn registry "
            f"publish prompt {reference.partition('@')[0]} prompt.txt --alias production") from None
    variables = template_variables(text, f"the seed prompt {version.ref} in {registry.location}")
    if variables and injection == "gateway":
        names = ", ".join(f"{{{name}}}" for name in sorted(variables))
        raise InjectionError(f"the seed prompt {version.ref} has template variables ({names}), which the agent "
                             "fills; the gateway would put the prompt in verbatim. Run with --inject registry, "
                             f"for an agent that reads it with tracelearn.prompt({version.name!r})")
    return version, text


def _policy_reference(config: ApoConfig) -> str:
    """What the fingerprint calls the policy: the model as served (pinned), or the name at the URL."""
    endpoint = config.policy_endpoint
    if endpoint is None:
        assert config.policy_model is not None
        return pinned_model(config.policy_model, config.registry)[0]
    if config.policy_name is not None:
        return config.policy_name
    cards = model_cards(endpoint)
    if len(cards) != 1:
        listed = ", ".join(str(card["id"]) for card in cards) or "none"
        raise UnknownModelError(f"{endpoint} serves {len(cards)} models ({listed}); choose the policy with "
                                "--policy-name")
    return str(cards[0]["id"])


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _search_config(config: ApoConfig, seed_version: ArtifactVersion, pool: FailurePool, policy: str,
                   optimizer_model: str) -> dict[str, Any]:
    """What decides the search: a resumed run must match it (see ``run_files``)."""
    spec = config.spec
    return {
        "prompt": seed_version.ref,
        "prompt_digest": seed_version.digest,
        "transitions": str(pool.root),
        "transitions_config_hash": pool.config_hash,
        "transitions_files": pool.snapshot(),
        "failure_threshold": pool.threshold,
        "agent": list(spec.agent),
        "tasks": str(spec.tasks),
        "tasks_digest": _file_digest(spec.tasks),
        "limit": spec.limit,
        "samples": spec.samples,
        "pipeline_config_digest": _file_digest(spec.pipeline_config),
        "success_threshold": spec.success_threshold,
        "policy": policy,
        "injection": config.injection,
        "optimizer_model": optimizer_model,
        "optimizer_temperature": config.optimizer_temperature,
        "optimizer_max_tokens": config.optimizer_max_tokens,
        **config.search.resume_key(),
    }


@contextmanager
def _policy(config: ApoConfig, policy: str, files: RunFiles, console: Console) -> Iterator[ServedModel]:
    endpoint = config.policy_endpoint
    if endpoint is not None:
        with served_model(policy, files.out, config.spec.server_start_timeout_s, console,
                          base_url=endpoint) as served:
            yield served
        return
    workdir = files.out / "policy"
    workdir.mkdir(parents=True, exist_ok=True)
    with served_model(policy, workdir, config.spec.server_start_timeout_s, console,
                      registry=config.registry) as served:
        yield served


# --- Outcome ----------------------------------------------------------------------------------------


def _labelled(result: EvalResult, label: str) -> EvalResult:
    """``result`` as reports name it: by the registry version of its prompt."""
    return dataclasses.replace(result, registry_version=label)


def _result_of(evaluator: PromptEvaluator, outcome: SearchOutcome, candidate: Candidate) -> EvalResult:
    if candidate.id in outcome.results:
        return outcome.results[candidate.id]
    assert candidate.prompt is not None
    return evaluator.evaluate(candidate.id, candidate.prompt).result  # a resumed run: from the cache


def _score_document(candidate: Candidate) -> dict[str, Any]:
    return {"candidate": candidate.id, "prompt": candidate.prompt,
            "score": None if candidate.score is None else candidate.score.to_dict(),
            "vs_seed": None if candidate.vs_seed is None else candidate.vs_seed.to_dict()}


def _gate_document(gate: GateOutcome | None, held_out: bool) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {"decision": None if gate.decision is None else gate.decision.to_dict(), "note": gate.note,
            "tasks": gate.tasks, "held_out": held_out, "rollouts_run": gate.rollouts_run}


def _summary(config: ApoConfig, outcome: SearchOutcome, inputs: ApoInputs, published: ArtifactVersion | None,
             gate: GateOutcome | None, wall_time_s: float) -> dict[str, Any]:
    edits = [c for c in outcome.candidates if c.id != outcome.seed.id]
    scored = [c for c in edits if c.score is not None]
    best_edit = max(scored, key=lambda c: c.score.success_rate if c.score else 0.0, default=None)
    winner = outcome.winner
    if winner is not None:
        verdict = f"{winner.id} beats the seed prompt beyond noise (paired 95% interval above 0)"
    else:
        verdict = "the seed prompt stands: no candidate beat it beyond noise (paired 95% interval above 0)"
    return {
        "prompt": inputs.seed_version.name,
        "seed": {"version": inputs.seed_version.ref, **_score_document(outcome.seed)},
        "winner": None if winner is None else _score_document(winner),
        "best_edit": None if best_edit is None else _score_document(best_edit),
        "verdict": verdict,
        "stop": outcome.stop,
        "stop_reason": outcome.stop_reason,
        "rounds_completed": outcome.rounds_completed,
        "candidates": {"proposed": len(edits), "evaluated": len(scored),
                       "failed": sum(c.status == "failed" for c in edits),
                       "unevaluated": sum(c.status == "unevaluated" for c in edits),
                       "rejected": dict(Counter(c.rejection.kind for c in edits if c.rejection is not None))},
        "rollouts_run": outcome.rollouts_run,
        "optimizer": {"url": config.optimizer_url, "model": inputs.optimizer_model,
                      "tokens": outcome.tokens.to_dict(),
                      "tokens_per_round": [r.tokens.to_dict() for r in outcome.rounds[1:]]},
        "failures": {"transitions": str(inputs.pool.root), "failed_rollouts": len(inputs.pool.failures),
                     "rollouts": inputs.pool.rollouts, "threshold": inputs.pool.threshold},
        "validation": {"tasks": str(config.spec.tasks), "limit": config.spec.limit, "samples": config.spec.samples,
                       "seed": config.spec.seed, "injection": config.injection},
        "published": None if published is None else published.ref,
        "gate": _gate_document(gate, config.gate_tasks is not None),
        "wall_time_s": round(wall_time_s, 3),
    }


def _report(console: Console, summary: dict[str, Any], results: list[EvalResult], files: RunFiles) -> None:
    comparison = compare(results[0], results[1]) if len(results) == 2 else None
    console.print(results_table(results, comparison))
    console.print(summary["verdict"], highlight=False)
    tokens = summary["optimizer"]["tokens"]
    console.print(f"stopped: {summary['stop_reason']}; {summary['rollouts_run']} rollouts run, "
                  f"{tokens['total_tokens']} optimizer tokens ({tokens['prompt_tokens']} prompt + "
                  f"{tokens['completion_tokens']} completion) in {tokens['calls']} calls", highlight=False)
    gate = summary["gate"]
    if summary["published"] and gate is not None:
        decision = gate["decision"]
        where = f"held-out {gate['tasks']}" if gate["held_out"] else "the validation rollouts that chose it"
        verdict = gate["note"] or (("promoted to production: " if decision["promote"] else "not promoted: ")
                                   + decision["reason"])
        console.print(f"published {summary['published']} as candidate; gated on {where}: {verdict}",
                      highlight=False)
    console.print(f"wrote {files.summary}, {files.tree}, {files.best_prompt}", highlight=False)


# --- The run ----------------------------------------------------------------------------------------


def check_inputs(config: ApoConfig, console: Console | None = None) -> ApoInputs:
    """Check everything a run needs before anything starts (step 1 of the module docstring; the run
    directory is checked by :func:`run_apo`). Raises what :func:`run_apo` raises before its search."""
    registry = open_registry(config.registry)
    seed_version, seed_text = _seed_prompt(registry, config.prompt, config.injection)
    pool = load_failures(config.transitions, config.threshold, config.config_hash)
    task_ids, _ = read_task_ids(config.spec.tasks, config.spec.limit)
    gate_spec = config.gate_spec
    if gate_spec is not None:
        read_task_ids(gate_spec.tasks)
    eval_pipeline_config(config.spec.pipeline_config)
    per_evaluation = len(task_ids) * config.spec.samples
    if config.search.max_rollouts is not None and config.search.max_rollouts < per_evaluation:
        raise ValueError(f"--max-rollouts {config.search.max_rollouts} does not cover one evaluation ({len(task_ids)} "
                         f"tasks x {config.spec.samples} samples = {per_evaluation} rollouts)")
    optimizer_model = resolve_optimizer_model(config.optimizer_url, config.optimizer_name, config.optimizer_api_key)
    inputs = ApoInputs(registry, seed_version, seed_text, pool, optimizer_model, _policy_reference(config),
                       len(task_ids))
    if console is not None:
        console.print(f"improving {seed_version.ref} from {pool.describe()}; "
                      f"{config.search.failures_per_critique} per critique, by {optimizer_model}", highlight=False)
    return inputs


def run_apo(config: ApoConfig, console: Console | None = None) -> ApoResult:
    """Run APO as configured (see the module docstring).

    Raises, before anything runs: ``RegistryError`` (no such prompt), ``TemplateError`` (the seed's
    braces), :class:`InjectionError`, ``NoFailuresError``, ``DatasetError``, ``TasksFileError``,
    ``PipelineConfigError``, ``ValueError`` (a budget below one evaluation), ``OptimizerError``,
    ``ResumeConflictError``, ``UnknownModelError`` / ``ModelServerError`` (the policy); during the
    search ``SeedEvaluationError`` and ``PromptNotSubstitutedError``.
    """
    console = console or Console(stderr=True)
    started = time.monotonic()
    inputs = check_inputs(config, console)
    files = RunFiles(config.out)
    files.start(_search_config(config, inputs.seed_version, inputs.pool, inputs.policy, inputs.optimizer_model),
                config.restart)
    spans = OptimizerSpans(files.optimizer_spans)
    try:
        optimizer = OptimizerModel(config.optimizer_url, inputs.optimizer_model, spans.tracer,
                                   api_key=config.optimizer_api_key, temperature=config.optimizer_temperature,
                                   max_tokens=config.optimizer_max_tokens)
        with _policy(config, inputs.policy, files, console) as served:
            apo_registry = open_registry(files.registry)
            cache = config.cache or files.cache

            def evaluator_for(spec: EvalSpec, workdir: Path) -> PromptEvaluator:
                return PromptEvaluator(inputs.seed_version.name, spec, served, apo_registry, workdir, cache, console,
                                       config.injection)

            evaluator = evaluator_for(config.spec, files.evaluations)
            outcome = beam_search(inputs.seed_text, optimizer, evaluator, inputs.pool, config.search, files, console)
            seed_result = _result_of(evaluator, outcome, outcome.seed)
            results = [_labelled(seed_result, inputs.seed_version.ref)]
            published = gate = None
            if outcome.winner is not None:
                winner_result = _result_of(evaluator, outcome, outcome.winner)
                lineage = winner_lineage(outcome, outcome.winner, inputs.seed_version, inputs.pool, config.out.name, {
                    "optimizer": {"url": config.optimizer_url, "model": inputs.optimizer_model},
                    "validation_tasks": str(config.spec.tasks), "samples": config.spec.samples,
                    "seed": config.spec.seed, "tree": str(files.tree)})
                published = publish_winner(inputs.registry, inputs.seed_version.name, outcome.winner, lineage,
                                           config.out.name)
                gate_spec = config.gate_spec
                held_out = None if gate_spec is None else evaluator_for(gate_spec, files.evaluations / "gate")
                gate = gate_published(inputs.registry, published, outcome.winner, winner_result,
                                      inputs.seed_version, seed_result, evaluator,
                                      GateConfig(margin=config.margin, require_significant=True), held_out)
                results.insert(0, _labelled(winner_result, published.ref))
    finally:
        spans.close()
    summary = _summary(config, outcome, inputs, published, gate, time.monotonic() - started)
    best = outcome.winner or outcome.seed
    files.best_prompt.write_text(best.prompt or "", encoding="utf-8")
    write_evaluations(files.eval, results, compare(results[0], results[1]) if len(results) == 2 else None)
    if gate is not None and gate.decision is not None:
        gate.decision.write(files.gate)
        if config.gate_tasks is not None:
            write_evaluations(files.gate_eval, gate.results,
                              compare(gate.results[0], gate.results[1]) if len(gate.results) == 2 else None)
    write_json_atomically(files.summary, summary)
    _report(console, summary, results, files)
    return ApoResult(outcome, inputs.seed_version, published, gate, summary, files)
