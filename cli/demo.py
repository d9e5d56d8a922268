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
from pathlib import Path

import click
from rich.console import Console

from tracelearn.cli.loop import run_rounds_in_airflow
from tracelearn.cli.spans import render_stats
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.training.loop import LoopError, prepare_loop, run_loop, serve_production, wait_for_version
from tracelearn.training.loop_demo import FULL, QUICK, ExampleNotFoundError, demo_spec
from tracelearn.training.loop_report import loop_table, write_loop_report
from tracelearn.training.loop_spec import LoopSpecError

# In a clone (the repository root is the package), the example sits beside the code; an installed
# package has no examples/, and the demo says so instead of guessing.
CLONE_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "calc"


@click.command()
@click.option("--quick", is_flag=True, help="A few tasks and samples per step (CI smoke run, about three minutes).")
@click.option("--model", default="smollm2", show_default=True, help="Policy model to start from.")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Rounds of the loop (default: 2).")
@click.option("--airflow", "use_airflow", is_flag=True, help="Run each round as the tracelearn_loop DAG (dag.test()).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where the run's data goes (default: runs/demo-<time>).")
@click.option("--example-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The calc example's directory (default: examples/calc of the clone tracelearn runs from).")
def demo(quick: bool, model: str, rounds: int | None, use_airflow: bool, workdir: Path | None,
         example_dir: Path | None) -> None:
    """On-policy GRPO rounds on the tool task: capture, transitions, train, gate, hot swap, round after round."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tracelearn loop: spinning OpenMP threads on a shared CPU
    started = time.monotonic()
    example = (example_dir or CLONE_EXAMPLE).resolve()
    if example_dir is None and not example.is_dir():
        raise click.ClickException("tracelearn demo runs the calc example of a clone of the repository "
                                   f"(examples/calc/), and there is none at {example}: this tracelearn is installed, "
                                   "not cloned. Run it from a clone (scripts/demo.sh), or pass --example-dir DIR")
    size = QUICK if quick else FULL
    rounds = rounds or size.rounds
    workdir = (workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        spec, config = demo_spec(size, model, workdir, example)
    except ExampleNotFoundError as error:
        raise click.ClickException(str(error)) from None
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
