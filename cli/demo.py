"""``tracelearn demo``: the on-policy learning loop on the tool task, end to end on the embedded defaults
(no GPU, no network, no accounts).

1. publish the policy (SmolLM2-135M-Instruct) to a registry in the run's folder as ``calc-policy``,
   alias ``production``, and serve ``registry:calc-policy@production``: the server follows the alias and
   hot-swaps each promoted version in;
2. rounds of the loop (``tracelearn.training.loop``, or with ``--airflow`` the ``tracelearn_loop`` DAG
   under ``dag.test()``), each one: the bundled calculator agent (code unchanged) runs the product tasks
   under ``opentelemetry-instrument``, exporting OTLP to a collector sidecar, against the live server;
   spans -> credited transitions (``examples/calc/pipeline.yaml``: the reward is on the final answer
   only); GRPO (LoRA, CPU) from the version that collected; the checkpoint published as ``candidate``
   with its lineage; candidate and production evaluated on the held-out tasks with the same seeds;
   the gate promotes the candidate only if it beats production; the next round collects with it;
3. the per-round table (held-out success with 95% intervals, tool-call rate, turns) and ``loop.png``.

``--quick`` runs a few tasks and samples per step (the CI smoke run). The run's folder is a loop workdir:
``tracelearn loop --workdir <it> --config <it>/loop.yaml`` reports on it, or continues it with more rounds.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import yaml
from rich.console import Console

from tracelearn.cli.loop import run_rounds_in_airflow
from tracelearn.cli.spans import render_stats
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.training.loop import LoopError, prepare_loop, run_loop, serve_production, wait_for_version
from tracelearn.training.loop_report import loop_table, write_loop_report
from tracelearn.training.loop_spec import LoopSpec, LoopSpecError, load_loop_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "calc"
EXAMPLE_LOOP = EXAMPLE / "loop.yaml"
EXAMPLE_TRAIN_CONFIG = EXAMPLE / "train.yaml"


@dataclass(frozen=True)
class DemoSize:
    """How much each round runs: training tasks and samples, held-out tasks and samples, epochs, rounds."""

    train_tasks: int
    train_samples: int
    eval_tasks: int | None
    eval_samples: int
    epochs: int | None  # None: the train config's
    rounds: int


FULL = DemoSize(train_tasks=24, train_samples=4, eval_tasks=32, eval_samples=2, epochs=None, rounds=2)
QUICK = DemoSize(train_tasks=6, train_samples=4, eval_tasks=8, eval_samples=1, epochs=1, rounds=2)


def demo_spec(size: DemoSize, model: str, workdir: Path) -> tuple[LoopSpec, Path]:
    """``examples/calc/loop.yaml`` at the demo's size (its train config written to ``workdir``), and the
    written loop config (so ``tracelearn loop`` can report on or continue the demo's folder)."""
    train = yaml.safe_load(EXAMPLE_TRAIN_CONFIG.read_text(encoding="utf-8"))
    if size.epochs is not None:
        train["grpo"]["epochs"] = size.epochs
    (workdir / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False), encoding="utf-8")
    raw = yaml.safe_load(EXAMPLE_LOOP.read_text(encoding="utf-8"))
    raw.update(model=model, pipeline=str(EXAMPLE / raw["pipeline"]), train=str(workdir / "train.yaml"),
               capture="sidecar", agent=raw["agent"].replace("python agent.py", f"python {EXAMPLE / 'agent.py'}"),
               collect={**raw["collect"], "tasks": str(EXAMPLE / raw["collect"]["tasks"]), "limit": size.train_tasks,
                        "samples": size.train_samples},
               evaluate={**raw["evaluate"], "tasks": str(EXAMPLE / raw["evaluate"]["tasks"]),
                         "limit": size.eval_tasks, "samples": size.eval_samples})
    path = workdir / "loop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_loop_spec(path), path


@click.command()
@click.option("--quick", is_flag=True, help="A few tasks and samples per step (CI smoke run, about three minutes).")
@click.option("--model", default="smollm2", show_default=True, help="Policy model to start from.")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Rounds of the loop (default: 2).")
@click.option("--airflow", "use_airflow", is_flag=True, help="Run each round as the tracelearn_loop DAG (dag.test()).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where the run's data goes (default: runs/demo-<time>).")
def demo(quick: bool, model: str, rounds: int | None, use_airflow: bool, workdir: Path | None) -> None:
    """On-policy GRPO rounds on the tool task: capture, transitions, train, gate, hot swap, round after round."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tracelearn loop: spinning OpenMP threads on a shared CPU
    started = time.monotonic()
    size = QUICK if quick else FULL
    rounds = rounds or size.rounds
    workdir = (workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        spec, config = demo_spec(size, model, workdir)
    except LoopSpecError as error:
        raise click.ClickException(f"invalid example config: {error}") from error

    console.rule("[bold]1. publish the policy to the registry and serve its production alias (followed, hot-swapped)")
    failure: str | None = None
    try:
        registry = prepare_loop(spec, workdir, console)
        with serve_production(spec, registry, workdir, console) as base_url:
            console.rule(f"[bold]2. {rounds} on-policy GRPO rounds: the agent under opentelemetry-instrument -> "
                         "collector sidecar -> transitions -> GRPO -> candidate -> held-out evaluation -> gate")
            console.print(f"tool task: {spec.collect.limit} training tasks x {spec.collect.samples} samples per round, "
                          f"held-out {spec.evaluate.limit or 'all'} tasks x {spec.evaluate.samples} samples; agent: "
                          f"{' '.join(spec.agent[1:])}", highlight=False)
            if use_airflow:
                run_rounds_in_airflow(spec, config, workdir, rounds, base_url, console)
            else:
                run_loop(spec, workdir, rounds, console=console, base_url=base_url)
            production = registry.resolve(f"{spec.name}@production")
            waited = wait_for_version(base_url, production) or 0.0
            console.print(f"the live server at {base_url} answers with [bold]{production.ref}[/] (swapped "
                          f"{waited:.1f} s after the last gate; requests in flight finished on the old weights)")
    except LoopError as error:
        failure = str(error)

    console.rule("[bold]3. round by round")
    first = workdir / "rounds" / "01" / "data"
    if first.exists():
        console.print("what the sidecar captured in round 1:")
        render_stats(spans_stats(first), console)
    rows = write_loop_report(workdir)
    if rows:
        console.print(loop_table(rows))
        plot = workdir / "loop.png"
        evaluated = [row for row in rows if row.production_eval is not None]
        if len(evaluated) > 1:
            before, after = evaluated[0].production_eval, evaluated[-1].production_eval
            assert before is not None and after is not None
            console.print(f"held-out success: round 0 {100 * before['success_rate']:.1f}% -> round "
                          f"{evaluated[-1].number} {100 * after['success_rate']:.1f}%; tool calls "
                          f"{100 * before['tool_call_rate']:.1f}% -> {100 * after['tool_call_rate']:.1f}% "
                          f"({after['n']} rollouts each, same tasks and seeds); plot: {plot}")
    if failure is not None:
        raise click.ClickException(f"the demo stopped: {failure}")
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {workdir}")
