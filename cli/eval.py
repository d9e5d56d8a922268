"""``tracelearn eval``: run an agent on held-out tasks against a model version and score it.

The model is served with ``tracelearn serve`` for the evaluation (or reached at ``--base-url``); the
agent runs under ``opentelemetry-instrument`` and is scored by the pipeline config's reward function
(``tracelearn.training.evaluate``). ``--compare-with`` evaluates a second version on the same tasks,
samples and seed and prints the paired comparison. Each evaluation works in its own folder under
``--out``, which also receives ``eval.json`` and ``eval_rollouts.parquet``. Errors are one line.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import click
from rich.console import Console

from tracelearn.pipelines.config import PipelineConfigError
from tracelearn.training.eval_inputs import EvalSpec, EvaluationError
from tracelearn.training.eval_results import EvalResult, compare, results_table, write_evaluations
from tracelearn.training.evaluate import evaluate_model


def _folder_name(position: int, model: str) -> str:
    """A readable folder per evaluation, unique by position: ``1-registry-calc-policy-production``, or
    ``2-checkpoint`` for ``./runs/43/checkpoint`` (a path's last part)."""
    name = Path(model).name if "/" in model and not model.startswith("registry:") else model
    return f"{position}-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "model")


@click.command("eval")
@click.option("--model", required=True,
              help="Model to evaluate: a model directory, a .gguf file, 'smollm2', or registry:NAME@ALIAS "
                   "(pinned to the version it names); with --base-url, a model name that server lists.")
@click.option("--tasks", "tasks_path", type=click.Path(path_type=Path), required=True,
              help="JSONL tasks, one object with a unique id per line (the calc example's held-out tasks: "
                   "examples/calc/tasks_heldout.jsonl in a clone).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N tasks.")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Runs per task.")
@click.option("--seed", type=int, default=0, show_default=True, help="Passed to the agent (same seeds per version).")
@click.option("--agent", "agent_text", required=True,
              help="Agent command, e.g. 'python examples/calc/agent.py'. Gets --tasks/--samples/--seed appended "
                   "unless it holds {tasks}/{samples}/{seed}; {concurrency} is replaced; 'python' is this "
                   "environment's.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="pipeline.yaml whose reward function scores every rollout (e.g. examples/calc/pipeline.yaml).")
@click.option("--threshold", type=float, default=1.0, show_default=True,
              help="A rollout succeeds when its reward is at least this.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Tasks in flight (the {concurrency} placeholder).")
@click.option("--agent-timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True,
              help="Seconds before a hung agent is killed.")
@click.option("--base-url", default=None, help="An already running OpenAI-compatible server (vLLM, tracelearn serve).")
@click.option("--compare-with", default=None, help="A second model, evaluated on the same tasks and seeds.")
@click.option("--compare-base-url", default=None, help="Where --compare-with is served (default: --base-url).")
@click.option("--registry", "registry_location", default=None, metavar="LOCATION",
              help="Registry for registry: models (default: $TRACELEARN_REGISTRY).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: runs/eval-<time>).")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json's document on stdout (progress on stderr).")
def eval_command(model: str, tasks_path: Path, limit: int | None, samples: int, seed: int, agent_text: str,
                 config_path: Path, threshold: float, concurrency: int, agent_timeout: float, base_url: str | None,
                 compare_with: str | None, compare_base_url: str | None, registry_location: str | None,
                 out: Path | None, as_json: bool) -> None:
    """Evaluate MODEL: run the agent on held-out tasks, score every rollout, report the success rate."""
    console = Console(stderr=as_json)
    try:
        agent = shlex.split(agent_text)
    except ValueError as error:
        raise click.ClickException(f"--agent: cannot split {agent_text!r} into words ({error})") from None
    if not agent:
        raise click.ClickException("--agent: the command is empty")
    try:
        spec = EvalSpec(agent=tuple(agent), tasks=tasks_path, samples=samples, seed=seed, limit=limit,
                        pipeline_config=config_path, success_threshold=threshold, concurrency=concurrency,
                        agent_timeout_s=agent_timeout)
    except ValueError as error:  # what click's types do not check (a threshold of nan)
        raise click.ClickException(str(error)) from None
    out = out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    models = [(model, base_url)]
    if compare_with is not None:
        models.append((compare_with, compare_base_url or base_url))
    results: list[EvalResult] = []
    for position, (reference, url) in enumerate(models, 1):
        if len(models) > 1:
            console.rule(f"[bold]{position}/{len(models)}: {reference}")
        try:
            results.append(evaluate_model(reference, spec, out / _folder_name(position, reference), base_url=url,
                                          registry=registry_location, console=console))
        except (EvaluationError, PipelineConfigError) as error:
            raise click.ClickException(str(error)) from None
    comparison = compare(results[0], results[1]) if len(results) == 2 else None
    path = write_evaluations(out, results, comparison)
    if as_json:
        click.echo(path.read_text(encoding="utf-8"), nl=False)
        return
    console.print(results_table(results, comparison))
    console.print(f"wrote {path} and {out / 'eval_rollouts.parquet'}")

