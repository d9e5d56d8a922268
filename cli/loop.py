"""``tracelearn loop``: on-policy rounds of collect -> build -> train -> publish -> evaluate -> gate.

Calls ``tracelearn.training.loop.run_loop`` (or, with ``--airflow``, runs the ``tracelearn_loop`` DAG with
``dag.test()`` once per round, both on the same steps), then prints the per-round table and writes
``<workdir>/loop.png``. Run again with the same arguments, it resumes at the step it was in; with a
larger ``--rounds``, it goes on from the last round. SIGTERM stops it like Ctrl-C (its children stopped).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from tracelearn.training.loop import LoopError, prepare_loop, run_loop, serve_production
from tracelearn.training.loop_report import loop_table, write_loop_report
from tracelearn.training.loop_spec import LoopSpec, LoopSpecError, load_loop_spec


def run_rounds_in_airflow(spec: LoopSpec, config: Path, workdir: Path, rounds: int, base_url: str | None,
                          console: Console) -> None:
    """The ``tracelearn_loop`` DAG once per unsettled round, under ``dag.test()`` in a throwaway Airflow home."""
    from tracelearn.cli.airflow_local import DagRequest, TaskProgress, run_dags
    from tracelearn.training.loop import RoundState

    registry = prepare_loop(spec, workdir, console)
    progress = TaskProgress()

    def show(line: str) -> None:
        if message := progress.message(line):
            console.print(f"  task {message}", highlight=False)

    context = serve_production(spec, registry, workdir, console) if base_url is None else None
    url = context.__enter__() if context is not None else base_url
    try:
        for number in range(1, rounds + 1):
            if RoundState.load(workdir, number).settled:
                continue
            console.rule(f"round {number}: airflow dags test tracelearn_loop")
            conf = {"config": str(config), "workdir": str(workdir), "rounds": rounds, "base_url": url or ""}
            result = run_dags(workdir / "airflow", [DagRequest("tracelearn_loop", conf)],
                              env={"TRACELEARN_REGISTRY": str(workdir / "registry"), "COLUMNS": "200"},
                              timeout=6 * 3600, log_path=workdir / "rounds" / f"{number:02d}" / "airflow.log",
                              on_line=show)
            if not result.succeeded:
                failure = [line for line in result.output.splitlines() if "AirflowFailException" in line]
                raise LoopError(f"round {number}: the tracelearn_loop DAG run failed"
                                + (f": {failure[-1]}" if failure else f" (log: {workdir / 'rounds'})"))
    finally:
        if context is not None:
            context.__exit__(*sys.exc_info())


@click.command("loop")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="loop.yaml: the agent, tasks, pipeline, trainer and gate (the calc example's: "
                   "examples/calc/loop.yaml in a clone).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Rounds in all.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("runs/loop"), show_default=True,
              help="Where every round keeps its data, run, evaluation and gate.json (resumed when it exists).")
@click.option("--base-url", default=None,
              help="A running server that follows registry:NAME@production (default: one is started).")
@click.option("--trainer", type=click.Choice(["grpo", "sft"]), default=None, help="Override the config's trainer.")
@click.option("--airflow", "use_airflow", is_flag=True, help="Run each round as the tracelearn_loop DAG (dag.test()).")
def loop(config_path: Path, rounds: int, workdir: Path, base_url: str | None, trainer: str | None,
         use_airflow: bool) -> None:
    """Collect with production, train, evaluate against production, promote if better; round after round."""
    console = Console(width=None if sys.stdout.isatty() else 160)
    # Before torch loads, here and in every child: OpenMP threads that spin while waiting make a model
    # server several times slower on a shared CPU (16 rollouts: 420 s spinning, 30 s passive, 2 cores at load 7).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        spec = load_loop_spec(config_path)
    except LoopSpecError as error:
        raise click.ClickException(str(error)) from None
    if trainer is not None:
        spec = spec.replace(trainer=trainer)
    workdir = workdir.resolve()
    started = time.monotonic()
    failure: str | None = None
    try:
        if use_airflow:
            run_rounds_in_airflow(spec, config_path.resolve(), workdir, rounds, base_url, console)
        else:
            run_loop(spec, workdir, rounds, console=console, base_url=base_url)
    except LoopError as error:
        failure = str(error)
    rows = write_loop_report(workdir)
    if rows:
        console.print(loop_table(rows))
        console.print(f"plot: {workdir / 'loop.png'}; per round: {workdir / 'rounds'}")
    if failure is not None:
        raise click.ClickException(f"the loop stopped: {failure}\n(earlier rounds and their promoted versions are "
                                   f"kept; fix the cause and run the same command to resume)")
    console.print(f"{rounds} rounds done in {time.monotonic() - started:.0f} s; everything is under {workdir}")
