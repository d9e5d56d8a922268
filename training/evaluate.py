"""Evaluation: run an agent on held-out tasks against one model version, score it, compare two versions.

:func:`evaluate_model` measures one model version end to end, through the same parts production uses:

1. Inputs are checked before anything starts: the tasks file (JSONL, one object with a unique ``id``
   per line; the first ``limit`` are copied to ``workdir/tasks.jsonl``, the file the agent reads),
   the pipeline config (its reward function imported), the agent's executable, and the model. A
   ``registry:NAME@ALIAS`` reference is resolved and pinned to ``registry:NAME@N``, so an alias that
   moves during the evaluation cannot change what is measured.
2. Serving: ``tracelearn serve --model MODEL --port <free port>`` as a subprocess (its log in
   ``workdir/server.log``), or ``base_url``, an already running vLLM or embedded server. Its
   ``/v1/models`` card gives the name the agent requests and the ``model_version`` that answered.
3. The agent command runs under ``opentelemetry-instrument --traces_exporter tracelearn`` (its output
   in ``workdir/agent.log``): its spans land in ``workdir/data``. A hung agent is killed after
   ``agent_timeout_s``.
4. Scoring: rollouts are built from the captured spans with the pipeline config
   (``tracelearn.pipelines.build.build_transitions``; no watermark wait, since the agent has exited
   and flushed, and rollouts without a reward are kept rather than dropped, so they count as
   failures). Each expected ``(task_id, sample)`` pair, ``tasks x samples`` of them, is matched with
   its rollout; a pair with no rollout, or a rollout without a reward, is a failure and is counted.

The agent contract: any command that reads the tasks file, runs each task ``samples`` times, and calls
the OpenAI-compatible API at ``$OPENAI_BASE_URL`` with model ``$OPENAI_MODEL``. It gets
``--tasks PATH --samples N --seed S`` appended, except where its arguments hold the placeholders
``{tasks}``, ``{samples}``, ``{seed}`` (replaced instead); ``{concurrency}`` is replaced and never
appended, since not every agent takes it. A first word ``python`` or ``python3`` means this
environment's interpreter, the one whose OpenTelemetry instrumentations capture the calls. Each
rollout names its task with ``tracelearn.task.id`` and its sample with ``tracelearn.metadata.sample``
(the bundled calc agent sets both); a task's rollouts without a sample attribute are numbered by start
time. Progress counts the JSON lines the agent prints (the calc agent prints one per rollout).

Statistics: the success rate's 95% interval is Wilson's score interval (:func:`wilson_interval`);
:func:`compare` pairs two evaluations' rollouts by ``(task_id, sample)`` and gives the difference of
success rates with Newcombe's paired score interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import PipelineConfig, WatermarkConfig, load_config
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.processes import ChildProcessError, console_script, free_port, start_child
from tracelearn.registry import DEFAULT_ALIAS, REGISTRY_ENV, ArtifactRef, RegistryError, open_registry
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import DatasetError

__all__ = [
    "DEFAULT_AGENT",
    "DEFAULT_PIPELINE",
    "DEFAULT_TASKS",
    "AgentError",
    "CaptureError",
    "Comparison",
    "EvalResult",
    "EvalSpec",
    "EvaluationError",
    "ModelServerError",
    "ServedModel",
    "TasksFileError",
    "UnknownModelError",
    "agent_command",
    "compare",
    "eval_pipeline_config",
    "evaluate_model",
    "model_cards",
    "pair_rollouts",
    "paired_difference_interval",
    "pinned_model",
    "read_task_ids",
    "results_table",
    "rollout_samples",
    "run_agent",
    "served_model",
    "wilson_interval",
    "write_evaluations",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO_ROOT / "examples" / "calc"
DEFAULT_AGENT: tuple[str, ...] = (sys.executable, str(EXAMPLE_DIR / "agent.py"), "--concurrency", "{concurrency}")
DEFAULT_TASKS = EXAMPLE_DIR / "tasks_heldout.jsonl"
DEFAULT_PIPELINE = EXAMPLE_DIR / "pipeline.yaml"
REGISTRY_PREFIX = "registry:"
SAMPLE_ATTRIBUTE = f"{sc.METADATA_PREFIX}sample"
# Appended unless the command holds the placeholder; {concurrency} is only ever substituted.
APPENDED_ARGUMENTS: tuple[tuple[str, str], ...] = (("tasks", "--tasks"), ("samples", "--samples"), ("seed", "--seed"))
PYTHON_NAMES = frozenset({"python", "python3"})
Z_95 = 1.959963984540054
ROLLOUT_SCHEMA = pl.Schema({
    "task_id": pl.String,
    "sample": pl.Int64,
    "rollout_id": pl.String,
    "status": pl.String,
    "reward": pl.Float64,
    "success": pl.Boolean,
})
# The spans' ``attributes`` map, read as the list of entries polars can filter.
ATTRIBUTE_ENTRIES = pl.List(pl.Struct({"key": pl.String, "value": pl.String}))
MISSING_STATUS = "missing"  # the agent left no rollout for this (task, sample)


class EvaluationError(Exception):
    """An evaluation could not run; the message names the file, the command or the server, and what to do."""


class TasksFileError(EvaluationError, ValueError):
    """The tasks file is missing, empty, or has a line that is not a task with a unique ``id``."""


class UnknownModelError(EvaluationError, LookupError):
    """The model names nothing that can be served (no such path, registry artifact, or served model)."""


class ModelServerError(EvaluationError):
    """The model server exited, did not become ready, or answered ``/v1/models`` with something else."""


class AgentError(EvaluationError):
    """The agent command was not found, exited with an error, or ran past its timeout."""


class CaptureError(EvaluationError):
    """The agent ran but no spans landed in the evaluation's dataset."""


@dataclass(frozen=True)
class EvalSpec:
    """What to run and how to score it; the same spec gives two versions the same tasks and seeds.

    ``agent`` is the command (see the module docstring for its placeholders); ``tasks`` a JSONL file
    of tasks (``limit``: only the first N); every task runs ``samples`` times; ``seed`` is passed to
    the agent (the calc agent seeds every request from it, the task, the sample and the turn). A rollout
    succeeds when the pipeline's primary reward is at least ``success_threshold``.
    """

    agent: Sequence[str] = DEFAULT_AGENT
    tasks: Path = DEFAULT_TASKS
    samples: int = 4
    seed: int = 0
    limit: int | None = None
    pipeline_config: Path = DEFAULT_PIPELINE
    success_threshold: float = 1.0
    concurrency: int = 4
    agent_timeout_s: float = 3600.0
    server_start_timeout_s: float = 300.0
    service_name: str = "tracelearn-eval"

    def __post_init__(self) -> None:
        if not self.agent:
            raise ValueError("EvalSpec.agent: the agent command is empty")
        for name in ("samples", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalSpec.{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalSpec.limit must be at least 1 (or None for every task), got {self.limit}")
        for name in ("agent_timeout_s", "server_start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EvalSpec.{name} must be a positive number of seconds, got {getattr(self, name)}")
        if not math.isfinite(self.success_threshold):
            raise ValueError(f"EvalSpec.success_threshold must be a finite number, got {self.success_threshold}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": list(self.agent),
            "tasks": str(self.tasks),
            "samples": self.samples,
            "seed": self.seed,
            "limit": self.limit,
            "pipeline_config": str(self.pipeline_config),
            "success_threshold": self.success_threshold,
            "concurrency": self.concurrency,
        }


@dataclass(frozen=True, eq=False)
class EvalResult:
    """One model version's evaluation: a row per expected ``(task_id, sample)`` and what they add up to.

    ``model`` is the reference as given; ``registry_version`` the registry version it was pinned to
    (``calc-policy@3``, or ``None`` for a path or an external server); ``served_model`` the name the
    agent requested and ``model_version`` the version the server reported (``None`` when its
    ``/v1/models`` card has none, as vLLM's); ``agent_command`` the command as run (placeholders
    filled, without the ``opentelemetry-instrument`` prefix). ``rollouts`` columns: ``task_id``, ``sample``,
    ``rollout_id`` (null when the agent left none), ``status`` (the rollout's ``ok`` / ``error`` /
    ``incomplete``, or ``missing``), ``reward`` (the primary reward, null when none), ``success``.
    ``unmatched_rollouts`` counts captured rollouts that are no expected pair (an unknown task id, a
    sample out of range, or a second rollout of one pair); they are not scored.
    """

    model: str
    registry_version: str | None
    served_model: str
    model_version: str | None
    base_url: str
    spec: EvalSpec
    agent_command: tuple[str, ...]
    tasks: int
    rollouts: pl.DataFrame
    unmatched_rollouts: int
    pipeline_config_hash: str
    data_dir: Path
    wall_time_s: float

    @property
    def n(self) -> int:
        return self.rollouts.height

    @property
    def successes(self) -> int:
        return int(self.rollouts["success"].sum())

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson 95% interval of the success rate."""
        return wilson_interval(self.successes, self.n)

    @property
    def mean_reward(self) -> float | None:
        """Mean primary reward over the rollouts that have one (``None`` when none has)."""
        mean = self.rollouts["reward"].drop_nulls().mean()
        return float(mean) if isinstance(mean, int | float) else None

    @property
    def missing_rewards(self) -> int:
        """Rollouts the agent ran that got no reward (counted as failures)."""
        rollouts = self.rollouts
        return rollouts.filter(pl.col("reward").is_null() & (pl.col("status") != MISSING_STATUS)).height

    @property
    def missing_rollouts(self) -> int:
        """Expected ``(task_id, sample)`` pairs the agent left no rollout for (counted as failures)."""
        return self.rollouts.filter(pl.col("status") == MISSING_STATUS).height

    @property
    def agent_errors(self) -> int:
        """Rollouts with an error span (a failed model call, a tool that raised)."""
        return self.rollouts.filter(pl.col("status") == "error").height

    @property
    def label(self) -> str:
        """How reports name this version: the registry version it was pinned to, else the model as given."""
        return self.registry_version or self.model

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "model": self.model,
            "registry_version": self.registry_version,
            "served_model": self.served_model,
            "model_version": self.model_version,
            "base_url": self.base_url,
            "spec": self.spec.to_dict(),
            "agent_command": list(self.agent_command),
            "tasks": self.tasks,
            "n": self.n,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "interval_95": [low, high],
            "mean_reward": self.mean_reward,
            "missing_rewards": self.missing_rewards,
            "missing_rollouts": self.missing_rollouts,
            "agent_errors": self.agent_errors,
            "unmatched_rollouts": self.unmatched_rollouts,
            "pipeline_config_hash": self.pipeline_config_hash,
            "data_dir": str(self.data_dir),
            "wall_time_s": round(self.wall_time_s, 3),
        }


# --- Statistics -------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion: ``(center - half, center + half)`` with

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n),   p = successes / n.

    Unlike the normal approximation it stays inside [0, 1] and is not a point at 0 or n successes.
    ``n == 0`` gives ``(0.0, 1.0)``: nothing is known.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two evaluations on the same tasks and seeds, paired by ``(task_id, sample)``.

    ``both`` / ``only_a`` / ``only_b`` / ``neither`` count the pairs by which side succeeded;
    ``difference`` is ``a``'s success rate minus ``b``'s over the ``pairs`` and ``interval`` its 95%
    interval (Newcombe's method 10, see :func:`compare`). ``unpaired_a`` / ``unpaired_b`` count the
    rollouts of each side whose pair the other side lacks (different tasks files or limits).
    """

    a: EvalResult
    b: EvalResult
    pairs: int
    both: int
    only_a: int
    only_b: int
    neither: int
    unpaired_a: int
    unpaired_b: int
    difference: float
    interval: tuple[float, float]

    @property
    def a_rate(self) -> float:
        return (self.both + self.only_a) / self.pairs if self.pairs else 0.0

    @property
    def b_rate(self) -> float:
        return (self.both + self.only_b) / self.pairs if self.pairs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.label,
            "b": self.b.label,
            "pairs": self.pairs,
            "both": self.both,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "neither": self.neither,
            "unpaired_a": self.unpaired_a,
            "unpaired_b": self.unpaired_b,
            "a_success_rate": self.a_rate,
            "b_success_rate": self.b_rate,
            "difference": self.difference,
            "interval_95": list(self.interval),
        }


def compare(a: EvalResult, b: EvalResult, z: float = Z_95) -> Comparison:
    """``a`` against ``b``, rollout by rollout: the difference of success rates on shared pairs.

    The interval is Newcombe's (1998) method 10 for paired proportions: with Wilson intervals
    ``(l1, u1)`` of ``a``'s rate ``p1`` and ``(l2, u2)`` of ``b``'s rate ``p2`` over the pairs, and
    ``phi`` the correlation of the 2x2 table (0 when a margin is empty),

        lower = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        upper = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2),   d = p1 - p2.

    Chosen over the normal approximation on per-pair differences, which collapses to a point when
    every discordant pair goes one way (5 of 5 pairs won would be "[+100, +100]"). Raises ``ValueError``
    when the two evaluations used different seeds or success thresholds: their pairs would not be
    the same draws, or their successes not the same event.
    """
    for name in ("seed", "success_threshold"):
        if getattr(a.spec, name) != getattr(b.spec, name):
            raise ValueError(
                f"cannot compare {a.label} and {b.label}: they were evaluated with {name} "
                f"{getattr(a.spec, name)} and {getattr(b.spec, name)}; evaluate both with the same spec"
            )
    keys = ["task_id", "sample"]
    paired = a.rollouts.select(*keys, pl.col("success").alias("a")).join(
        b.rollouts.select(*keys, pl.col("success").alias("b")), on=keys, how="inner"
    )
    pairs = paired.height
    both = paired.filter(pl.col("a") & pl.col("b")).height
    only_a = paired.filter(pl.col("a") & ~pl.col("b")).height
    only_b = paired.filter(~pl.col("a") & pl.col("b")).height
    neither = pairs - both - only_a - only_b
    return Comparison(
        a=a,
        b=b,
        pairs=pairs,
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=neither,
        unpaired_a=a.n - pairs,
        unpaired_b=b.n - pairs,
        difference=(only_a - only_b) / pairs if pairs else 0.0,
        interval=paired_difference_interval(both, only_a, only_b, neither, z),
    )


def paired_difference_interval(both: int, only_a: int, only_b: int, neither: int,
                               z: float = Z_95) -> tuple[float, float]:
    """Newcombe's method-10 interval for ``p_a - p_b`` from a paired 2x2 table (see :func:`compare`)."""
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, d - below), min(1.0, d + above)


# --- Rendering --------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def results_table(results: Sequence[EvalResult], comparison: Comparison | None = None) -> Table:
    """Versions side by side: n, success rate [95% interval], mean reward, and the failures by cause
    (rollouts without a reward, pairs without a rollout, rollouts with an error); with a comparison, a
    last row with its paired difference in percentage points and its discordant pairs."""
    table = Table(title="evaluation", title_justify="left", caption_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("version", overflow="fold")
    table.add_column("n", justify="right")
    table.add_column("success [95% CI]", justify="right", no_wrap=True)
    for column in ("mean reward", "no reward", "missing", "errors"):
        table.add_column(column, justify="right")
    for result in results:
        low, high = result.interval
        mean = result.mean_reward
        table.add_row(
            result.label,
            result.model_version or "-",
            str(result.n),
            f"{_percent(result.success_rate)} [{_percent(low)}, {_percent(high)}]",
            "-" if mean is None else f"{mean:.3f}",
            str(result.missing_rewards),
            str(result.missing_rollouts),
            str(result.agent_errors),
        )
    if comparison is not None:
        low, high = comparison.interval
        table.add_section()
        table.add_row("difference", f"{comparison.a.label} - {comparison.b.label}", str(comparison.pairs),
                      f"{_points(comparison.difference)} pts [{_points(low)}, {_points(high)}]")
        table.caption = (f"paired by (task, sample): only {comparison.a.label} succeeded on {comparison.only_a}, "
                         f"only {comparison.b.label} on {comparison.only_b}, both on {comparison.both}, "
                         f"neither on {comparison.neither}; 95% CI by Newcombe's paired score method")
    return table


def write_evaluations(out: Path, results: Sequence[EvalResult], comparison: Comparison | None = None) -> Path:
    """Write ``out/eval.json`` (``{"evaluations": [...], "comparison": {...} | null}``) and
    ``out/eval_rollouts.parquet`` (every result's rollouts with a ``model`` column); return the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "evaluations": [result.to_dict() for result in results],
        "comparison": comparison.to_dict() if comparison is not None else None,
    }
    path = out / "eval.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    frames = [result.rollouts.with_columns(pl.lit(result.label).alias("model")) for result in results]
    pl.concat(frames).select("model", *ROLLOUT_SCHEMA.names()).write_parquet(out / "eval_rollouts.parquet")
    return path


# --- Inputs -----------------------------------------------------------------------------------------


def read_task_ids(path: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """The task ids and raw lines of the first ``limit`` tasks of a JSONL tasks file.

    Raises :class:`TasksFileError` naming the file and line for a missing file, a line that is not
    a JSON object with an ``id``, a repeated id, or a file without tasks.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TasksFileError(f"{path}: cannot read the tasks file ({error.strerror or error})") from None
    ids: list[str] = []
    lines: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TasksFileError(f"{path}:{number}: not JSON ({error.msg}); write one task object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str | int) or isinstance(row.get("id"), bool):
            raise TasksFileError(f'{path}:{number}: a task must be a JSON object with an "id" (string or integer)')
        task_id = str(row["id"])
        if task_id in seen:
            raise TasksFileError(
                f"{path}:{number}: task id {task_id!r} repeats line {seen[task_id]}; ids must be unique"
            )
        seen[task_id] = number
        ids.append(task_id)
        lines.append(line)
        if limit is not None and len(ids) == limit:
            break
    if not ids:
        raise TasksFileError(f"{path}: the tasks file holds no tasks")
    return ids, lines


def agent_command(spec: EvalSpec, tasks_file: Path) -> list[str]:
    """The agent's argument list with placeholders filled and the missing arguments appended.

    Raises :class:`AgentError` when its executable is neither a file nor on ``PATH``.
    """
    values = {"tasks": str(tasks_file), "samples": str(spec.samples), "seed": str(spec.seed),
              "concurrency": str(spec.concurrency)}
    command = list(spec.agent)
    if command[0] in PYTHON_NAMES:
        command[0] = sys.executable
    if not (Path(command[0]).is_file() or shutil.which(command[0])):
        raise AgentError(f"agent command not found: {command[0]!r} is neither a file nor on PATH")
    text = " ".join(command)
    filled = []
    for argument in command:
        for name, value in values.items():
            argument = argument.replace(f"{{{name}}}", value)
        filled.append(argument)
    for name, flag in APPENDED_ARGUMENTS:
        if f"{{{name}}}" not in text:
            filled += [flag, values[name]]
    return filled


def eval_pipeline_config(path: Path) -> PipelineConfig:
    """The pipeline config as evaluation runs it: no watermark wait (the agent has exited and flushed)
    and rollouts without a reward kept (they are failures, not absences).

    The bundled configs name reward functions by module path (``examples.calc.reward:score``), so the
    repository root goes on ``sys.path``, appended: installed packages keep precedence. Raises
    ``PipelineConfigError`` naming the file and key.
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    config = load_config(path)
    return dataclasses.replace(
        config,
        reward=dataclasses.replace(config.reward, missing="keep"),
        watermark=WatermarkConfig(lateness_seconds=0.0),
    )


def pinned_model(model: str, registry: str | None) -> tuple[str, str | None]:
    """``model`` as the server gets it, and the registry version it names (``None`` for a path or name).

    ``registry:NAME@ALIAS`` becomes ``registry:NAME@N`` (``registry:NAME`` means ``@production``);
    anything else must resolve with ``tracelearn.serving.model_store.resolve_model``. Raises
    :class:`UnknownModelError` saying what is missing.
    """
    if model.startswith(REGISTRY_PREFIX):
        location = registry or os.environ.get(REGISTRY_ENV)
        try:
            ref = ArtifactRef.parse(model.removeprefix(REGISTRY_PREFIX), default_alias=DEFAULT_ALIAS)
            version = open_registry(location).resolve(ref)
        except RegistryError as error:
            raise UnknownModelError(f"{model}: {error}") from None
        if version.kind != "checkpoint":
            raise UnknownModelError(f"{model} names {version.ref}, a {version.kind}, not a model checkpoint")
        return f"{REGISTRY_PREFIX}{version.ref}", version.ref
    from tracelearn.models import ModelNotFoundError, resolve_model

    try:
        resolve_model(model)
    except ModelNotFoundError as error:
        raise UnknownModelError(str(error)) from None
    return model, None


# --- Serving ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """A model answering at ``base_url``: the name to request and the version the server reports."""

    base_url: str
    name: str
    model_version: str | None


def model_cards(base_url: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The ``data`` of ``GET {base_url}/models``; raises :class:`ModelServerError` naming the URL."""
    url = f"{base_url.rstrip('/')}/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise ModelServerError(f"no OpenAI-compatible server answers {url}: {error}") from None
    except json.JSONDecodeError:
        raise ModelServerError(
            f"{url} answered something other than JSON; is it an OpenAI-compatible server?"
        ) from None
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list) or not all(isinstance(card, dict) and "id" in card for card in cards):
        raise ModelServerError(f"{url} did not answer an OpenAI model list ({{'data': [{{'id': ...}}]}})")
    return cards


def _models_answer(base_url: str) -> bool | None:
    """``True`` once ``{base_url}/models`` answers a model list, else ``None`` (the readiness probe)."""
    try:
        model_cards(base_url, timeout_s=2.0)
    except ModelServerError:
        return None
    return True


@contextmanager
def served_model(model: str, workdir: Path, timeout_s: float, console: Console, *,
                 base_url: str | None = None, registry: str | None = None) -> Iterator[ServedModel]:
    """``model`` answering somewhere for the duration of the block.

    With ``base_url``, ``model`` must be one of the models that server lists. Otherwise ``tracelearn
    serve`` is started on a free port (``TRACELEARN_REGISTRY`` set to ``registry`` when given) and
    stopped on exit; it must serve exactly one model.
    """
    if base_url is not None:
        cards = model_cards(base_url)
        card = next((card for card in cards if card["id"] == model), None)
        if card is None:
            listed = ", ".join(str(card["id"]) for card in cards) or "none"
            raise UnknownModelError(f"{base_url} does not serve {model!r} (it serves: {listed})")
        yield ServedModel(base_url, model, card.get("model_version"))
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = workdir / "server.log"
    env = {**os.environ, REGISTRY_ENV: registry} if registry is not None else dict(os.environ)
    try:
        command = [console_script("tracelearn"), "serve", "--model", model, "--port", str(port)]
        server = start_child(command, name="the model server", log=log, env=env)
    except ChildProcessError as error:
        raise ModelServerError(str(error)) from None
    with server:
        try:
            with console.status(f"loading {model} into tracelearn serve (log: {log}) ..."):
                server.wait_until(lambda: _models_answer(url), timeout_s, "it was ready")
        except ChildProcessError as error:
            raise ModelServerError(str(error)) from None
        cards = model_cards(url)
        if len(cards) != 1:
            raise ModelServerError(f"tracelearn serve at {url} lists {len(cards)} models; expected one")
        served = ServedModel(url, str(cards[0]["id"]), cards[0].get("model_version"))
        console.print(f"serving {model} as {served.name} (version {served.model_version}) at {url}")
        yield served
        # A server that died mid-run fails every later call: the numbers would measure the crash.
        if server.returncode is not None:
            raise ModelServerError(f"the model server exited with code {server.returncode} during the "
                                   f"evaluation: {server.tail()} (log: {log})")


# --- The agent --------------------------------------------------------------------------------------


def run_agent(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float, expected: int,
              console: Console, traces_exporter: str = "tracelearn") -> None:
    """Run ``command`` under ``opentelemetry-instrument``; raises :class:`AgentError` with the last line
    of its log when it exits with an error or runs past ``timeout_s`` (then its process group is killed).

    ``traces_exporter``: ``tracelearn`` writes the dataset from the agent process (``$TRACELEARN_DATA``);
    ``otlp`` sends standard OTLP to a collector (``$OTEL_EXPORTER_OTLP_ENDPOINT``). Progress counts the
    JSON objects the agent prints on lines of their own (how the calc agent reports a finished rollout)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("agent: rollouts reported", total=expected)

        def on_line(line: str) -> None:
            if line.lstrip().startswith("{"):
                progress.advance(task)

        try:
            instrumented = [console_script("opentelemetry-instrument"), "--traces_exporter", traces_exporter, *command]
            start_child(instrumented, name="the agent", log=log_path, env=env, on_line=on_line).check(timeout_s)
        except ChildProcessError as error:
            raise AgentError(str(error)) from None


# --- Scoring ----------------------------------------------------------------------------------------


def rollout_samples(spans: pl.LazyFrame) -> pl.LazyFrame:
    """``rollout_id, sample``: the first ``tracelearn.metadata.sample`` value on a rollout's spans, as an
    integer (null when absent or not an integer). Reads spans ``rollout_id``, ``start_time``, ``attributes``."""
    value = (
        pl.col("attributes")
        .cast(ATTRIBUTE_ENTRIES)
        .list.eval(pl.element().filter(pl.element().struct.field("key") == SAMPLE_ATTRIBUTE))
        .list.first()
        .struct.field("value")
    )
    # Attribute values that are not strings are stored as JSON text: 3 and "3" both read as 3.
    sample = value.str.strip_chars('"').cast(pl.Int64, strict=False).alias("sample")
    return (
        spans.select("rollout_id", "start_time", sample)
        .filter(pl.col("sample").is_not_null())
        .sort("start_time")
        .group_by("rollout_id")
        .agg(pl.col("sample").first())
    )


def pair_rollouts(rollouts: pl.DataFrame, samples: pl.DataFrame, task_ids: Sequence[str], per_task: int,
                  threshold: float) -> tuple[pl.DataFrame, int]:
    """One row per expected ``(task_id, sample)`` (see ``EvalResult.rollouts``) and the count of captured
    rollouts left unmatched.

    ``rollouts`` is the pipeline's rollouts table (reads ``rollout_id``, ``task_id``, ``status``,
    ``final_reward``, ``start_time``); ``samples`` gives ``rollout_id, sample`` where the agent recorded
    one. A task's rollouts without one are numbered by start time; of two rollouts of one pair the
    earlier is scored.
    """
    keys = ["task_id", "sample"]
    ranked = (
        rollouts.lazy()
        .join(samples.lazy(), on="rollout_id", how="left")
        .sort("start_time", "rollout_id")
        .with_columns(
            pl.col("sample").fill_null(
                (pl.col("start_time").rank("ordinal").over("task_id", pl.col("sample").is_null()) - 1).cast(pl.Int64)
            )
        )
    )
    first = ranked.filter(pl.struct(keys).is_first_distinct())
    expected = pl.LazyFrame(
        {"task_id": [t for t in task_ids for _ in range(per_task)], "sample": list(range(per_task)) * len(task_ids)},
        schema={"task_id": pl.String, "sample": pl.Int64},
    )
    paired = (
        expected.join(first, on=keys, how="left", maintain_order="left")
        .select(
            *keys,
            "rollout_id",
            pl.col("status").fill_null(MISSING_STATUS),
            pl.col("final_reward").alias("reward"),
            (pl.col("final_reward") >= threshold).fill_null(False).alias("success"),
        )
        .collect()
    )
    scored = paired.filter(pl.col("rollout_id").is_not_null()).height
    return paired.cast(ROLLOUT_SCHEMA), rollouts.height - scored


# --- The whole evaluation ---------------------------------------------------------------------------


def evaluate_model(model: str, spec: EvalSpec, workdir: Path, *, base_url: str | None = None,
                   registry: str | None = None, console: Console | None = None) -> EvalResult:
    """Serve ``model`` (or use the server at ``base_url``), run the agent on the spec's tasks, score it.

    ``workdir`` receives ``tasks.jsonl``, ``server.log``, ``agent.log`` and ``data/`` (the captured
    spans, rollouts and transitions); its ``data/`` must not hold spans yet. ``registry`` is the
    registry location for ``registry:`` models (default ``$TRACELEARN_REGISTRY``). Progress goes to
    ``console`` (default: stderr). See the module docstring for the steps; raises a subclass of
    :class:`EvaluationError` (or ``PipelineConfigError``) naming what failed.
    """
    console = console or Console(stderr=True)
    started = time.monotonic()
    task_ids, task_lines = read_task_ids(spec.tasks, spec.limit)
    config = eval_pipeline_config(spec.pipeline_config)
    data = workdir / "data"
    if (data / "spans").exists() and any((data / "spans").iterdir()):
        raise EvaluationError(f"{data / 'spans'} already holds spans; evaluate into a fresh working directory")
    workdir.mkdir(parents=True, exist_ok=True)
    tasks_file = workdir / "tasks.jsonl"
    tasks_file.write_text("\n".join(task_lines) + "\n", encoding="utf-8")
    command = agent_command(spec, tasks_file)
    served_as, registry_version = (model, None) if base_url is not None else pinned_model(model, registry)
    expected = len(task_ids) * spec.samples
    with served_model(served_as, workdir, spec.server_start_timeout_s, console, base_url=base_url,
                      registry=registry) as served:
        env = {
            **os.environ,
            "OPENAI_BASE_URL": served.base_url,
            "OPENAI_MODEL": served.name,
            "OPENAI_API_KEY": "not-needed",
            "TRACELEARN_DATA": str(data),
            "OTEL_SERVICE_NAME": spec.service_name,
        }
        console.print(f"running {len(task_ids)} tasks x {spec.samples} samples (seed {spec.seed}) against "
                      f"{served.name}: {shlex.join(command)}", highlight=False)
        run_agent(command, env, workdir / "agent.log", spec.agent_timeout_s, expected, console)
    with console.status("building rollouts from the captured spans and scoring them ..."):
        try:
            build = build_transitions(data, data, config)
            spans = scan_spans(data)
        except DatasetError as error:
            raise CaptureError(f"the agent exited cleanly but no spans landed in {data} ({error}); is it a "
                               "program opentelemetry-instrument can instrument (Python, using an instrumented "
                               "client)?") from None
        # Every span belongs to a rollout, so a build that found spans wrote rollouts.
        rollouts = pl.read_parquet(build.rollouts_files)
        samples = rollout_samples(spans).collect()
        paired, unmatched = pair_rollouts(rollouts, samples, task_ids, spec.samples, spec.success_threshold)
    return EvalResult(
        model=model,
        registry_version=registry_version,
        served_model=served.name,
        model_version=served.model_version,
        base_url=served.base_url,
        spec=spec,
        agent_command=tuple(command),
        tasks=len(task_ids),
        rollouts=paired,
        unmatched_rollouts=unmatched,
        pipeline_config_hash=build.config_hash,
        data_dir=data,
        wall_time_s=time.monotonic() - started,
    )

