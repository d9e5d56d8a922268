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

The parts: ``eval_inputs`` (the spec, the tasks file, the agent command, the errors), ``eval_serving``
(the model answering at a URL), ``eval_results`` (results, statistics, comparison, reports); this module
runs the agent, scores its rollouts and holds :func:`evaluate_model`, the whole evaluation.
"""


from __future__ import annotations

import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.processes import ChildProcessError, console_script, start_child
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import DatasetError
from tracelearn.training.eval_inputs import (
    AgentError,
    CaptureError,
    EvalSpec,
    EvaluationError,
    agent_command,
    eval_pipeline_config,
    read_task_ids,
)
from tracelearn.training.eval_results import MISSING_STATUS, ROLLOUT_SCHEMA, EvalResult
from tracelearn.training.eval_serving import pinned_model, served_model

__all__ = ["evaluate_model", "pair_rollouts", "rollout_samples", "run_agent"]

SAMPLE_ATTRIBUTE = f"{sc.METADATA_PREFIX}sample"
# The spans' ``attributes`` map, read as the list of entries polars can filter.
ATTRIBUTE_ENTRIES = pl.List(pl.Struct({"key": pl.String, "value": pl.String}))


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

