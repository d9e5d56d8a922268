"""Scoring a candidate prompt by real rollouts: the agent runs with the candidate as its prompt.

For each candidate, :class:`PromptEvaluator`

1. publishes the prompt text as a version in APO's own registry (``<out>/registry``; content
   addressed, so a prompt seen before is the same version);
2. puts that version in front of the agent, one of two ways (``injection``):

   - ``gateway`` (the default; the agent needs no change): ``tracelearn gateway`` started as a process
     in front of the policy server (its log in ``<candidate workdir>/gateway.log``), its prompt rule
     pinned to the version, replaces the leading system message of every chat call the agent makes;
   - ``registry``: the agent reads its prompt with ``tracelearn.prompt(NAME)`` and fills its template
     variables itself; ``TRACELEARN_REGISTRY`` (APO's registry) and ``TRACELEARN_PROMPTS``
     (``NAME=NAME@N``) make that call resolve to the candidate, and the agent calls the policy directly.

   Both ways, the agent's environment carries the pin, so an agent that reads its system prompt with
   ``tracelearn.prompt`` sends the candidate itself;
3. runs :func:`~tracelearn.training.evaluate.evaluate_model`, so the agent runs under
   ``opentelemetry-instrument`` on the same tasks, samples and seed as every other candidate and is
   scored by the pipeline's reward function.

Results are cached on disk by (prompt hash, task, sample, seed) under a context key that covers
everything else that decides a rollout (agent command, pipeline config, success threshold, policy
version, injection), so a repeated evaluation runs no agent, and a partly cached one runs only the
tasks it lacks. An agent that fails or hangs (``AgentError``) or leaves no spans (``CaptureError``)
does not stop the run: its rollouts are recorded as failures (status ``agent_failed``), the error is
kept, and nothing is cached, so a later evaluation tries again.

The gateway records no spans of its own (``--no-spans``): the agent's instrumentation already
captures each call, and a second span per call would be a rollout of its own. Its ``/health`` counts
the chat calls and the substitutions, read before it stops.

May import: tracelearn.training.evaluate and its eval_* parts, tracelearn.processes (the gateway process),
tracelearn.registry, tracelearn.pipelines (the config hash), tracelearn.storage, polars.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console

from tracelearn.pipelines.config import config_hash
from tracelearn.processes import ChildProcessError, console_script, free_port, start_child
from tracelearn.registry import REGISTRY_ENV, Registry
from tracelearn.registry.prompts import PROMPTS_ENV, pinned_references
from tracelearn.storage.atomic_parquet import write_parquet_atomically
from tracelearn.training.apo.candidates import prompt_hash
from tracelearn.training.eval_inputs import (
    AgentError,
    CaptureError,
    EvalSpec,
    EvaluationError,
    eval_pipeline_config,
    read_task_ids,
)
from tracelearn.training.eval_results import ROLLOUT_SCHEMA, EvalResult
from tracelearn.training.eval_serving import ServedModel
from tracelearn.training.evaluate import evaluate_model

__all__ = [
    "AGENT_FAILED",
    "INJECTIONS",
    "CandidateEvaluation",
    "GatewayCounts",
    "GatewayError",
    "PromptEvaluator",
    "PromptNotSubstitutedError",
    "RolloutCache",
    "agent_environment",
    "prompt_gateway",
]

AGENT_FAILED = "agent_failed"  # the status of rollouts of an agent run that failed or hung
GATEWAY_READY_TIMEOUT_S = 120.0
INJECTIONS = ("gateway", "registry")  # how a candidate reaches the agent (see the module docstring)
_KEYS = ["task_id", "task_digest", "sample"]
CACHE_SCHEMA = pl.Schema([("task_digest", pl.String), *ROLLOUT_SCHEMA.items()])


class PromptNotSubstitutedError(RuntimeError):
    """The agent's chat calls carried no leading system message, so no candidate prompt could reach it."""


class GatewayError(EvaluationError):
    """The prompt gateway process did not start, or did not answer; the message names its log."""


@dataclass
class GatewayCounts:
    """Chat calls through the gateway, and how many of them got the candidate prompt."""

    chat_calls: int = 0
    substituted: int = 0


@dataclass(frozen=True)
class CandidateEvaluation:
    """A candidate's result over every expected (task, sample), what it cost, and how it ran.

    ``rollouts_run`` is 0 when everything came from the cache; ``evaluated_as`` is the prompt version
    the gateway substituted (``None`` when cached); ``agent_error`` says why the agent failed.
    """

    result: EvalResult
    rollouts_run: int
    evaluated_as: str | None
    agent_error: str | None
    gateway: GatewayCounts


def _gateway_health(base_url: str) -> dict[str, Any] | None:
    """The gateway's ``/health`` answer, or ``None`` while it does not answer."""
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as response:
            health = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None
    return health if isinstance(health, dict) else None


@contextmanager
def prompt_gateway(upstream: str, registry: Registry, reference: str,
                   log: Path) -> Iterator[tuple[str, GatewayCounts]]:
    """``tracelearn gateway`` in front of ``upstream`` substituting the prompt ``reference`` (output in ``log``):
    its base URL and its counts, which are filled in when the block ends, before the gateway stops.

    Raises :class:`GatewayError` when the gateway exits or does not answer within
    ``GATEWAY_READY_TIMEOUT_S``.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [console_script("tracelearn"), "gateway", "--upstream", upstream, "--port", str(port),
               "--token-ids", "off", "--no-spans", "--prompt-substitution", reference,
               "--registry", registry.location]
    counts = GatewayCounts()
    try:
        gateway = start_child(command, name="the prompt gateway", log=log)
    except ChildProcessError as error:
        raise GatewayError(str(error)) from None
    with gateway:
        try:
            gateway.wait_until(lambda: _gateway_health(base_url), GATEWAY_READY_TIMEOUT_S, "it answered /health")
        except ChildProcessError as error:
            raise GatewayError(str(error)) from None
        try:
            yield base_url, counts
        finally:
            health = _gateway_health(base_url) or {}
            counts.chat_calls = int(health.get("chat_calls", 0))
            counts.substituted = int(health.get("substituted", 0))


@contextmanager
def agent_environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block, restored after it.

    ``evaluate_model`` hands the agent this process's environment; setting it here, around one
    evaluation, is how the pin reaches the agent without a second copy of that function.
    """
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pins(name: str, reference: str) -> str:
    """``TRACELEARN_PROMPTS`` with ``name`` pinned to ``reference`` and the caller's other pins kept."""
    pins = {**pinned_references(), name: reference}
    return ",".join(f"{key}={value}" for key, value in pins.items())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RolloutCache:
    """Scored rollouts by (prompt hash, task, sample, seed) under ``directory/<context key>/``.

    A task is keyed by its id and the digest of its JSON line, so an edited task is a new one. The
    context (``context.json`` beside the files) is what else decides a rollout; another context is
    another folder.
    """

    def __init__(self, directory: Path, context: dict[str, Any]) -> None:
        text = json.dumps(context, sort_keys=True)
        self.directory = directory / _digest(text)[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "context.json").write_text(json.dumps(context, indent=2, sort_keys=True) + "\n",
                                                     encoding="utf-8")

    def _file(self, digest: str, seed: int) -> Path:
        return self.directory / f"{digest}-seed{seed}.parquet"

    def lookup(self, digest: str, seed: int) -> pl.DataFrame:
        path = self._file(digest, seed)
        return pl.read_parquet(path).cast(CACHE_SCHEMA) if path.exists() else CACHE_SCHEMA.to_frame()

    def store(self, digest: str, seed: int, rows: pl.DataFrame) -> None:
        """Add ``rows`` (CACHE_SCHEMA), replacing cached rows with the same key; the file appears atomically."""
        kept = self.lookup(digest, seed).join(rows.select(_KEYS), on=_KEYS, how="anti")
        merged = pl.concat([kept, rows.select(CACHE_SCHEMA.names())]).sort(_KEYS)
        write_parquet_atomically(merged.to_arrow(), self.directory, self._file(digest, seed).name, "zstd")


class PromptEvaluator:
    """Evaluates candidate prompts of ``prompt_name`` with ``spec`` against the ``policy`` server.

    ``registry`` is APO's own registry (candidates are published there); each agent run works in
    ``workdir/<candidate id>/``; ``injection`` is one of :data:`INJECTIONS`.
    """

    def __init__(self, prompt_name: str, spec: EvalSpec, policy: ServedModel, registry: Registry, workdir: Path,
                 cache: Path, console: Console, injection: str = "gateway") -> None:
        if injection not in INJECTIONS:
            raise ValueError(f"injection {injection!r}: use one of {', '.join(INJECTIONS)}")
        self.prompt_name = prompt_name
        self.spec = spec
        self.policy = policy
        self.registry = registry
        self.workdir = workdir
        self.console = console
        self.injection = injection
        task_ids, lines = read_task_ids(spec.tasks, spec.limit)
        self.tasks = list(zip(task_ids, (_digest(line.strip()) for line in lines), lines, strict=True))
        self.pipeline_config_hash = config_hash(eval_pipeline_config(spec.pipeline_config))
        self.cache = RolloutCache(cache, {
            "agent": list(spec.agent),
            "pipeline_config_hash": self.pipeline_config_hash,
            "success_threshold": spec.success_threshold,
            "policy": policy.model_version or policy.name,
            "injection": injection,
        })

    @property
    def rollouts_per_evaluation(self) -> int:
        return len(self.tasks) * self.spec.samples

    def _expected(self) -> pl.DataFrame:
        return pl.DataFrame(
            {"task_id": [t for t, _, _ in self.tasks for _ in range(self.spec.samples)],
             "task_digest": [d for _, d, _ in self.tasks for _ in range(self.spec.samples)],
             "sample": list(range(self.spec.samples)) * len(self.tasks)},
            schema={"task_id": pl.String, "task_digest": pl.String, "sample": pl.Int64},
        )

    def _missing_tasks(self, cached: pl.DataFrame) -> list[tuple[str, str, str]]:
        missing = self._expected().join(cached.select(_KEYS), on=_KEYS, how="anti")
        wanted = set(missing["task_digest"].to_list())
        return [task for task in self.tasks if task[1] in wanted]

    def rollouts_needed(self, prompt: str) -> int:
        """Rollouts an evaluation of ``prompt`` would run now (0 when the cache holds all of them)."""
        return len(self._missing_tasks(self.cache.lookup(prompt_hash(prompt), self.spec.seed))) * self.spec.samples

    def evaluate(self, candidate_id: str, prompt: str) -> CandidateEvaluation:
        """Score ``prompt`` on every (task, sample) (see the module docstring).

        Raises :class:`PromptNotSubstitutedError` when the agent called the model but never with a
        system message the gateway could replace, and the ``EvaluationError`` subclasses that are
        not the agent's own failure (the policy server unreachable, a bad pipeline config).
        """
        digest = prompt_hash(prompt)
        cached = self.cache.lookup(digest, self.spec.seed)
        missing = self._missing_tasks(cached)
        if not missing:
            return CandidateEvaluation(self._result(cached, None), 0, None, None, GatewayCounts())
        started = time.monotonic()
        version = self.registry.publish_prompt(self.prompt_name, prompt,
                                               metadata={"apo_candidate": candidate_id}).version
        workdir = self.workdir / candidate_id
        if workdir.exists():  # an evaluation interrupted before: ours to replace
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        requested = workdir / "requested-tasks.jsonl"
        requested.write_text("".join(line + "\n" for _, _, line in missing), encoding="utf-8")
        spec = dataclasses.replace(self.spec, tasks=requested, limit=None)
        error = None
        environment = {REGISTRY_ENV: self.registry.location, PROMPTS_ENV: _pins(self.prompt_name, version.ref)}
        with agent_environment(environment), self._endpoint(version.ref, workdir) as (base_url, counts):
            try:
                rows = evaluate_model(self.policy.name, spec, workdir, base_url=base_url, console=self.console).rollouts
            except (AgentError, CaptureError) as failure:
                error = str(failure)
                rows = self._failed_rows(missing)
        if error is None and counts is not None and counts.chat_calls and not counts.substituted:
            raise PromptNotSubstitutedError(
                f"none of the agent's {counts.chat_calls} chat calls began with a system message, so the gateway "
                f"could not give it the prompt {version.ref}; APO optimizes the system prompt of an agent that "
                f"sends one, or the prompt an agent reads with tracelearn.prompt (--inject registry) "
                f"(see {workdir / 'agent.log'})")
        digests = {task_id: task_digest for task_id, task_digest, _ in missing}
        fresh = rows.with_columns(pl.col("task_id").replace_strict(digests, return_dtype=pl.String)
                                  .alias("task_digest")).select(CACHE_SCHEMA.names())
        if error is None:
            self.cache.store(digest, self.spec.seed, fresh)
        merged = pl.concat([cached.join(fresh.select(_KEYS), on=_KEYS, how="anti"), fresh])
        return CandidateEvaluation(self._result(merged, time.monotonic() - started, workdir / "data"),
                                   len(missing) * self.spec.samples, version.ref, error, counts or GatewayCounts())

    @contextmanager
    def _endpoint(self, reference: str, workdir: Path) -> Iterator[tuple[str, GatewayCounts | None]]:
        """Where the agent's calls go: the substituting gateway and its counts, or the policy itself."""
        if self.injection == "registry":
            yield self.policy.base_url, None
            return
        with prompt_gateway(self.policy.base_url, self.registry, reference, workdir / "gateway.log") as endpoint:
            yield endpoint

    def _failed_rows(self, tasks: Sequence[tuple[str, str, str]]) -> pl.DataFrame:
        pairs = [(task_id, sample) for task_id, _, _ in tasks for sample in range(self.spec.samples)]
        return pl.DataFrame({"task_id": [t for t, _ in pairs], "sample": [s for _, s in pairs],
                             "rollout_id": [None] * len(pairs), "status": [AGENT_FAILED] * len(pairs),
                             "reward": [None] * len(pairs), "success": [False] * len(pairs)}, schema=ROLLOUT_SCHEMA)

    def _result(self, rows: pl.DataFrame, wall_time_s: float | None, data_dir: Path | None = None) -> EvalResult:
        """An ``EvalResult`` over every expected pair, in task order (rows: CACHE_SCHEMA)."""
        ordered = self._expected().join(rows, on=_KEYS, how="left", maintain_order="left").select(
            ROLLOUT_SCHEMA.names())
        return EvalResult(
            model=self.policy.name, registry_version=None, served_model=self.policy.name,
            model_version=self.policy.model_version, base_url=self.policy.base_url, spec=self.spec,
            agent_command=tuple(self.spec.agent), tasks=len(self.tasks), rollouts=ordered.cast(ROLLOUT_SCHEMA),
            unmatched_rollouts=0, pipeline_config_hash=self.pipeline_config_hash,
            data_dir=data_dir or self.cache.directory, wall_time_s=wall_time_s or 0.0,
        )
