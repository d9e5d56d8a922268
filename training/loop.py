"""The on-policy learning loop: round after round, the agent runs on the production policy, and the
policy trained on those runs replaces production only when it does better on held-out tasks.

One round (``<workdir>/rounds/NN/``), each step a function of its own that the CLI (``tracelearn loop``)
and the Airflow DAG (``tracelearn_loop``) both call through :func:`run_step`:

1. ``collect``: the agent runs the training tasks (round ``r`` draws seed ``collect.seed + r - 1``)
   against the production version, its spans captured under ``NN/data`` (through a collector sidecar
   started for the round, or the in-process exporter). With a live server (``base_url``, following
   ``registry:NAME@production``), the step first waits until it answers with the production version.
2. ``build``: spans -> rollouts and credited transitions (the loop's ``pipeline.yaml``). A collection
   whose rollouts mostly failed (server down, agent errors: more than ``max_error_share``) stops the
   loop here with the first error; so does a collection that captured nothing.
3. ``train``: GRPO (or SFT) from the version that generated the data, into ``NN/run``. A round whose
   task groups all scored alike has no learning signal: nothing is trained, and the round says so.
4. ``publish``: the checkpoint becomes a registry version with its lineage; ``candidate`` points at it.
5. ``evaluate``: candidate and production on the held-out tasks with the same seed, every round the
   same draws (an evaluation is kept per version under ``<workdir>/evals``, so production's is not
   run twice); ``NN/gate/eval.json`` holds both and their paired comparison. An evaluation that fails
   stops the loop: the candidate is never promoted.
6. ``gate``: promote when the candidate beats production by more than ``margin``; ``NN/gate/gate.json``
   records why either way. The next round collects with whatever production is then.

Each finished step is recorded in ``NN/round.json``; an interrupted loop (Ctrl-C, SIGTERM, a crash)
run again with the same command redoes the step it was in (its partial output removed) and goes on.
``<workdir>/loop.json`` keeps the settings: a workdir refuses to continue under other ones.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import PipelineConfigError, load_config
from tracelearn.processes import ChildProcess, ChildProcessError, console_script, free_port, start_child
from tracelearn.registry import REGISTRY_ENV, ArtifactVersion, Lineage, Registry, RegistryError, open_registry
from tracelearn.training.config import TrainConfigError, load_train_config
from tracelearn.training.data import NoTrainingDataError
from tracelearn.training.eval_inputs import (
    EvalSpec,
    EvaluationError,
    agent_command,
    eval_pipeline_config,
    read_task_ids,
)
from tracelearn.training.eval_results import compare, write_evaluations
from tracelearn.training.eval_serving import model_cards, served_model
from tracelearn.training.gate import GateConfig, GateConflictError, apply_gate, decide, publish_run
from tracelearn.training.loop_evals import VersionEvaluations
from tracelearn.training.loop_spec import LoopSpec
from tracelearn.training.train_steps import train_policy

__all__ = ["STEPS", "LoopContext", "LoopError", "RoundState", "prepare_loop", "run_loop", "run_step",
           "serve_production", "wait_for_version"]

STEPS: tuple[str, ...] = ("collect", "build", "train", "publish", "evaluate", "gate")
SERVER_READY_TIMEOUT_S = 300.0
SWAP_TIMEOUT_S = 300.0
AGENT_TIMEOUT_S = 3 * 3600.0
SIDECAR_STOP_GRACE_S = 120.0


class LoopError(RuntimeError):
    """The loop cannot go on: the message names the round, the step and the reason."""


@dataclass
class RoundState:
    """What one round has done: the outputs of its finished steps and, once settled, its outcome
    (``promoted``, ``not_promoted`` or ``no_signal``) and why."""

    number: int
    path: Path
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcome: str | None = None
    reason: str | None = None

    @classmethod
    def load(cls, workdir: Path, number: int) -> RoundState:
        path = workdir / "rounds" / f"{number:02d}"
        file = path / "round.json"
        if not file.exists():
            return cls(number, path)
        data = json.loads(file.read_text(encoding="utf-8"))
        return cls(number, path, data["steps"], data.get("outcome"), data.get("reason"))

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        document = {"round": self.number, "steps": self.steps, "outcome": self.outcome, "reason": self.reason}
        temporary = self.path / "round.json.tmp"
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        temporary.replace(self.path / "round.json")

    @property
    def settled(self) -> bool:
        return self.outcome is not None

    @property
    def data(self) -> Path:
        return self.path / "data"


@dataclass(frozen=True)
class LoopContext:
    """What every step needs: the settings, the workdir, the registry, where progress goes."""

    spec: LoopSpec
    workdir: Path
    registry: Registry
    console: Console
    base_url: str | None = None  # a live server following the production alias, if any
    progress: bool = True

    @property
    def evaluations(self) -> VersionEvaluations:
        return VersionEvaluations(self.workdir / "evals", self.eval_spec(), self.registry, self.console)

    def eval_spec(self) -> EvalSpec:
        held = self.spec.evaluate
        return EvalSpec(agent=self.spec.agent, tasks=held.tasks, samples=held.samples, seed=held.seed,
                        limit=held.limit, pipeline_config=self.spec.pipeline, concurrency=self.spec.concurrency)

    def production(self) -> ArtifactVersion:
        return self.registry.resolve(f"{self.spec.name}@production")


# --- Setup --------------------------------------------------------------------------------------------


def prepare_loop(spec: LoopSpec, workdir: Path, console: Console) -> Registry:
    """Check (or record) the workdir's settings and make sure production names a version: the starting
    model is published as version 1 of ``spec.name`` when the registry has none. Returns the registry."""
    try:  # before anything runs: a broken config should not cost a collection first
        eval_pipeline_config(spec.pipeline)  # its reward function found as the config names it
        load_train_config(spec.train)
    except (PipelineConfigError, TrainConfigError) as error:
        raise LoopError(str(error)) from None
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "loop.json"
    if record.exists():
        earlier = json.loads(record.read_text(encoding="utf-8"))
        if earlier.get("digest") != spec.digest():
            changed = sorted(k for k, v in spec.to_dict().items() if earlier.get("spec", {}).get(k) != v)
            raise LoopError(f"{workdir} holds a loop run with other settings (changed: {', '.join(changed)}); "
                            "run it with its own settings again, or choose a new --workdir")
    else:
        record.write_text(json.dumps({"digest": spec.digest(), "spec": spec.to_dict()}, indent=2) + "\n",
                          encoding="utf-8")
    registry = open_registry(workdir / "registry")
    if spec.name not in registry.names() or "production" not in registry.aliases(spec.name):
        from tracelearn.models import ModelNotFoundError, resolve_model

        try:
            source = resolve_model(spec.model)
        except ModelNotFoundError as error:
            raise LoopError(f"the starting model: {error}") from None
        files = source.directory / source.gguf_file if source.gguf_file else source.directory
        version = registry.publish("checkpoint", spec.name, files, lineage=Lineage(base_model=source.model_id),
                                   metadata={"source": spec.model}).version
        registry.promote(spec.name, version.version, "production", reason="loop: the starting policy")
        console.print(f"published {spec.model} as {version.ref}; production -> {version.version}")
    return registry


def _health(base_url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as response:
            state = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


@contextmanager
def serve_production(spec: LoopSpec, registry: Registry, workdir: Path, console: Console) -> Iterator[str]:
    """``tracelearn serve`` following ``registry:NAME@production`` (hot swaps on promotion) for the block;
    yields its base URL."""
    from tracelearn.training.eval_inputs import ModelServerError

    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [console_script("tracelearn"), "serve", "--model", f"registry:{spec.name}@production", "--port",
               str(port), "--served-model-name", spec.name, "--max-batch-size", "16", "--watch-interval", "1"]
    env = {**os.environ, REGISTRY_ENV: str(registry.location)}
    with start_child(command, name="the model server", log=workdir / "server.log", env=env) as server:
        try:
            with console.status(f"loading registry:{spec.name}@production into tracelearn serve ..."):
                server.wait_until(lambda: True if _health(base_url).get("model_version") else None,
                                  SERVER_READY_TIMEOUT_S, "it was ready")
        except ChildProcessError as error:
            raise ModelServerError(str(error)) from None
        console.print(f"serving registry:{spec.name}@production at {base_url} (log: {workdir / 'server.log'})")
        yield base_url


def wait_for_version(base_url: str, version: ArtifactVersion, timeout_s: float = SWAP_TIMEOUT_S) -> float | None:
    """Wait until the live server answers with ``version`` (it follows the alias); returns the seconds, or
    None for a server that does not say which version answers (vLLM, another OpenAI-compatible server)."""
    from tracelearn.models import registry_model_version

    wanted = registry_model_version(version)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        state = _health(base_url)
        if state.get("model_version") == wanted:
            return time.monotonic() - started
        if "model_version" not in state:
            if _answers(base_url):
                return None
            raise LoopError(f"the model server at {base_url} does not answer; is it running?")
        time.sleep(0.5)
    raise LoopError(f"the model server at {base_url} did not swap to {version.ref} within {timeout_s:.0f} s "
                    f"(it serves {_health(base_url).get('model_version')}; last swap error: "
                    f"{_health(base_url).get('last_swap_error')})")


def _answers(base_url: str) -> bool:
    try:
        model_cards(base_url, timeout_s=2.0)
    except EvaluationError:
        return False
    return True


# --- The steps ----------------------------------------------------------------------------------------


@contextmanager
def _sidecar(data: Path, log: Path) -> Iterator[str]:
    """A collector sidecar writing to ``data`` for the block (SIGTERM flushes it); yields its OTLP URL."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [console_script("tracelearn"), "collector", "serve", "--data", str(data), "--http",
               url.removeprefix("http://"), "--grpc", ""]
    process: ChildProcess = start_child(command, name="the collector sidecar", log=log)
    try:
        process.wait_until(lambda: True if _ready(f"{url}/ready") else None, 60, "it was ready")
        yield url
    finally:
        code = process.stop(grace_s=SIDECAR_STOP_GRACE_S)
    if code != 0:
        raise LoopError(f"the collector sidecar exited with code {code}: {process.tail()} (log: {log})")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _run_agent(command: list[str], env: dict[str, str], log: Path, exporter: str, console: Console,
               expected: int) -> None:
    """The agent under ``opentelemetry-instrument``; stopped (with its group) if this process is interrupted."""
    reported = 0

    def count(line: str) -> None:
        nonlocal reported
        if line.lstrip().startswith("{"):
            reported += 1

    instrumented = [console_script("opentelemetry-instrument"), "--traces_exporter", exporter, *command]
    with start_child(instrumented, name="the agent", log=log, env=env, on_line=count) as agent, \
            console.status(f"the agent: {expected} rollouts (log: {log}) ..."):
        agent.check(AGENT_TIMEOUT_S)
    console.print(f"the agent reported {reported} of {expected} rollouts")


@contextmanager
def _production_server(context: LoopContext, production: ArtifactVersion,
                       state: RoundState) -> Iterator[tuple[str, str]]:
    """(base URL, model name) answering with ``production``: the live server once it has swapped to it,
    or a server started for the block."""
    if context.base_url is not None:
        waited = wait_for_version(context.base_url, production)
        context.console.print(f"the live server answers with {production.ref} (waited {waited:.1f} s)" if waited
                              is not None else f"the server at {context.base_url} does not report its model "
                              f"version: collecting on the assumption that it serves {production.ref}")
        yield context.base_url, context.spec.name
        return
    with served_model(f"registry:{production.ref}", state.path, SERVER_READY_TIMEOUT_S, context.console,
                      registry=str(context.registry.location)) as served:
        yield served.base_url, served.name


def collect(context: LoopContext, state: RoundState) -> dict[str, Any]:
    """Step 1: the agent on the training tasks against production; spans under the round's ``data/``."""
    spec, production = context.spec, context.production()
    if state.data.exists():  # a collection interrupted earlier: its spans would double the rollouts
        shutil.rmtree(state.data)
    state.data.mkdir(parents=True)
    task_ids, lines = read_task_ids(spec.collect.tasks, spec.collect.limit)
    tasks_file = state.path / "tasks.jsonl"
    tasks_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seed = spec.collect.seed + state.number - 1
    agent_spec = EvalSpec(agent=spec.agent, tasks=tasks_file, pipeline_config=spec.pipeline,
                          samples=spec.collect.samples, seed=seed, concurrency=spec.concurrency)
    command = agent_command(agent_spec, tasks_file)
    started = time.monotonic()
    with _production_server(context, production, state) as (base_url, name):
        env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_MODEL": name, "OPENAI_API_KEY": "not-needed",
               "OTEL_SERVICE_NAME": f"{spec.name}-collect"}
        expected = len(task_ids) * spec.collect.samples
        context.console.print(f"collecting {len(task_ids)} tasks x {spec.collect.samples} samples (seed {seed}) "
                              f"with {production.ref} through {spec.capture} capture")
        if spec.capture == "sidecar":
            with _sidecar(state.data, state.path / "collector.log") as url:
                env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})
                _run_agent(command, env, state.path / "agent.log", "otlp", context.console, expected)
        else:
            env["TRACELEARN_DATA"] = str(state.data)
            _run_agent(command, env, state.path / "agent.log", "tracelearn", context.console, expected)
    return {"production": production.ref, "seed": seed, "rollouts_expected": expected,
            "seconds": round(time.monotonic() - started, 1)}


def build(context: LoopContext, state: RoundState) -> dict[str, Any]:
    """Step 2: rollouts and credited transitions; stops the loop when the collection mostly failed."""
    config = load_config(context.spec.pipeline)
    # The agent has exited and its spans are flushed: the watermark goes past the lateness allowance.
    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=config.watermark.lateness_seconds + 1)
    result = build_transitions(state.data, state.data, config, now=now)
    if not result.rollouts_files:
        raise LoopError(f"no rollouts were captured under {state.data}; see {state.path / 'agent.log'}")
    rollouts = pl.read_parquet(result.rollouts_files)
    failed = rollouts.filter(pl.col("status") == "error")
    share = failed.height / max(rollouts.height, 1)
    if share > context.spec.max_error_share:
        first = failed["error_message"].drop_nulls().head(1).to_list() or ["(no message)"]
        raise LoopError(f"{failed.height} of {rollouts.height} collected rollouts failed (more than "
                        f"{100 * context.spec.max_error_share:.0f}%); the first error: {first[0]}; "
                        f"see {state.path / 'agent.log'}")
    summary = result.summary
    return {
        "config_hash": result.config_hash,
        "rollouts": rollouts.height,
        "failed_rollouts": failed.height,
        "transitions": summary["transitions"],
        "groups": summary["groups"],
        "zero_signal_groups": summary["zero_signal_groups"],
        **rollouts.select(
            (pl.col("final_reward").fill_null(0.0) >= 1.0).mean().alias("success_rate"),
            (pl.col("n_tool_calls") > 0).mean().alias("tool_call_rate"),
            pl.col("n_llm_calls").mean().cast(pl.Float64).alias("mean_llm_calls"),
        ).row(0, named=True),
    }


def _measure_production(context: LoopContext, state: RoundState) -> None:
    """The held-out evaluation of the version that collected (kept per version: the report's baseline)."""
    try:
        context.evaluations.result(state.steps["collect"]["production"])
    except EvaluationError as error:
        raise LoopError(f"the evaluation of production failed: {error}") from None


def train(context: LoopContext, state: RoundState) -> dict[str, Any]:
    """Step 3: train from the version that collected the data; a round without signal trains nothing."""
    built, spec = state.steps["build"], context.spec
    if spec.trainer == "grpo" and built["groups"] == built["zero_signal_groups"]:
        state.outcome = "no_signal"
        state.reason = (f"no learning signal: in all {built['groups']} task groups every rollout scored the same "
                        f"(success {100 * built['success_rate']:.1f}%); nothing was trained, production stays")
        _measure_production(context, state)
        return {"trained": False}
    model = f"registry:{state.steps['collect']['production']}"
    try:
        result = train_policy(spec.trainer, state.data, model, state.path / "run", load_train_config(spec.train),
                              config_hash=built["config_hash"], overwrite=True, progress=context.progress,
                              registry=context.registry)
    except NoTrainingDataError as error:
        state.outcome, state.reason = "no_signal", f"no learning signal: {error}; nothing was trained"
        _measure_production(context, state)
        return {"trained": False}
    return {"trained": True, "run": str(result.run.path), "checkpoint": str(result.checkpoint),
            "lineage": str(result.run.lineage_path), "steps": result.summary["steps"],
            "sequences": result.summary["sequences"], "final": result.summary["final"]}


def publish(context: LoopContext, state: RoundState) -> dict[str, Any]:
    """Step 4: the checkpoint as the next registry version, ``candidate`` pointing at it."""
    trained = state.steps["train"]
    version = publish_run(context.registry, context.spec.name, Path(trained["checkpoint"]), Path(trained["lineage"]),
                          reason=f"loop round {state.number}")
    context.console.print(f"published {version.ref} as candidate")
    return {"candidate": version.ref, "version": version.version}


def evaluate(context: LoopContext, state: RoundState) -> dict[str, Any]:
    """Step 5: candidate and production on the held-out tasks, same seed; ``gate/eval.json``."""
    candidate_ref, production_ref = state.steps["publish"]["candidate"], context.production().ref
    evaluations = context.evaluations
    try:
        candidate = evaluations.result(candidate_ref)
    except EvaluationError as error:
        raise LoopError(f"the candidate {candidate_ref} failed its evaluation and is not promoted: {error}") from None
    production = evaluations.result(production_ref)
    write_evaluations(state.path / "gate", [candidate, production], compare(candidate, production))
    return {"candidate": candidate_ref, "production": production_ref}


def gate(context: LoopContext, state: RoundState) -> dict[str, Any]:
    """Step 6: promote the candidate if it beats production by the margin; ``gate/gate.json`` says why."""
    spec, evaluated = context.spec, state.steps["evaluate"]
    evaluations = context.evaluations
    candidate, production = evaluations.result(evaluated["candidate"]), evaluations.result(evaluated["production"])
    decision = decide(candidate, production, GateConfig(margin=spec.margin))
    version = state.steps["publish"]["version"]
    try:
        applied = apply_gate(context.registry, spec.name, version, decision)
    except GateConflictError:
        # Resumed after the alias moved but before this step was recorded: the promotion is done.
        if not (decision.promote and context.registry.aliases(spec.name).get("production") == version):
            raise
        applied = decision
    applied.write(state.path / "gate" / "gate.json")
    state.outcome = "promoted" if applied.promote else "not_promoted"
    state.reason = applied.reason
    return {"promote": applied.promote, "reason": applied.reason}


STEP_FUNCTIONS: dict[str, Callable[[LoopContext, RoundState], dict[str, Any]]] = {
    "collect": collect, "build": build, "train": train, "publish": publish, "evaluate": evaluate, "gate": gate,
}


def run_step(context: LoopContext, number: int, step: str) -> RoundState:
    """Run one step of round ``number`` unless it is recorded as done (or the round is settled)."""
    state = RoundState.load(context.workdir, number)
    if step in state.steps or state.settled:
        return state
    missing = [earlier for earlier in STEPS[: STEPS.index(step)] if earlier not in state.steps]
    if missing:
        raise LoopError(f"round {number}: step {step} needs {', '.join(missing)} first")
    context.console.rule(f"round {number}: {step}")
    try:
        state.steps[step] = STEP_FUNCTIONS[step](context, state)
    except (EvaluationError, ChildProcessError, RegistryError) as error:
        raise LoopError(f"round {number}, step {step}: {error}") from None
    except LoopError as error:
        raise LoopError(f"round {number}, step {step}: {error}") from None
    state.save()
    if state.settled:
        context.console.print(f"round {number}: {state.outcome}: {state.reason}", highlight=False)
    return state


def run_loop(spec: LoopSpec, workdir: Path, rounds: int, *, console: Console | None = None,
             base_url: str | None = None, progress: bool = True) -> list[RoundState]:
    """Rounds 1..``rounds`` (finished ones skipped); serves production itself unless ``base_url`` names a
    server that follows the production alias. Raises :class:`LoopError` naming the round, step and reason."""
    console = console or Console(stderr=True)
    registry = prepare_loop(spec, workdir, console)
    server = nullcontext(base_url) if base_url is not None else serve_production(spec, registry, workdir, console)
    with server as url:
        context = LoopContext(spec, workdir, registry, console, url, progress)
        for number in range(1, rounds + 1):
            for step in STEPS:
                if run_step(context, number, step).settled:
                    break
    return [RoundState.load(workdir, number) for number in range(1, rounds + 1)]
