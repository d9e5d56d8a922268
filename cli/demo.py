"""``tracelearn demo``: the learning loop end to end on the embedded defaults (no GPU, no network, no accounts).

1. publish the policy (SmolLM2-135M-Instruct) to a registry in the run's folder as ``calc-policy``,
   alias ``production``, and serve ``registry:calc-policy@production`` (the server follows the alias);
2. run the bundled calculator agent under ``opentelemetry-instrument`` (agent code unchanged) on the
   training tasks, several samples per task, and show what landed in the spans dataset;
3. build RL transitions with ``examples/calc/pipeline.yaml`` (a reward function re-scores every
   rollout from the gold answer the agent recorded) and show their statistics and ``report.png``;
4. train the policy on them (SFT on the rewarded replies by default, or GRPO; LoRA, on the CPU),
   with ``examples/calc/train.yaml``;
5. publish the checkpoint as ``candidate`` with its lineage, evaluate production (through the live
   server) and the candidate on the held-out tasks with the same seeds, and gate: promote only if
   the candidate beats production;
6. wait for the live server to swap to the promoted version, and print the before/after table and
   ``demo.png`` (held-out success with intervals, training loss).

``--quick`` runs a few tasks and samples of each step (the CI smoke run, about three minutes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from tracelearn.cli.spans import render_stats
from tracelearn.cli.transitions import render_build
from tracelearn.cli.transitions import render_stats as render_transition_stats
from tracelearn.collector.span_stats import spans_stats
from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import PipelineConfig, PipelineConfigError, WatermarkConfig, load_config
from tracelearn.pipelines.plots import plot_transitions
from tracelearn.pipelines.stats import scan_transitions, transition_distributions, transition_stats
from tracelearn.training.config import TrainConfig, TrainConfigError, load_train_config, with_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "calc"
EXAMPLE_AGENT = EXAMPLE / "agent.py"
EXAMPLE_TASKS = EXAMPLE / "tasks.jsonl"
HELDOUT_TASKS = EXAMPLE / "tasks_heldout.jsonl"
EXAMPLE_PIPELINE = EXAMPLE / "pipeline.yaml"
EXAMPLE_TRAIN_CONFIG = EXAMPLE / "train.yaml"
SERVER_READY_TIMEOUT_S = 300
SWAP_TIMEOUT_S = 300
AGENT_TIMEOUT_S = 3600
POLICY_NAME = "calc-policy"
COLLECT_SEED, EVAL_SEED = 11, 5


@dataclass(frozen=True)
class DemoSize:
    """How much of each step runs: tasks (None: all) and samples per task, for collection and evaluation."""

    train_tasks: int | None
    train_samples: int
    eval_tasks: int | None
    eval_samples: int
    epochs: int | None  # None: the train config's


FULL = DemoSize(train_tasks=None, train_samples=4, eval_tasks=None, eval_samples=2, epochs=None)
QUICK = DemoSize(train_tasks=8, train_samples=2, eval_tasks=6, eval_samples=1, epochs=1)


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_version(base_url: str, version: str, server: subprocess.Popen[bytes], log: Path,
                     console: Console) -> float:
    """Poll the server's ``/health`` until it serves ``version`` (its model_version); returns the seconds taken."""
    health = base_url.removesuffix("/v1") + "/health"
    started = time.monotonic()
    with console.status(f"waiting for the live server to load and swap in {version} ..."):
        while time.monotonic() - started < SWAP_TIMEOUT_S:
            if server.poll() is not None:
                raise click.ClickException(f"the model server exited; its log ends with:\n{log_tail(log)}")
            try:
                state = _get_json(health)
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                state = {}
            if state.get("model_version") == version:
                return time.monotonic() - started
            if state.get("last_swap_error"):
                raise click.ClickException(f"the server refused the promoted version: {state['last_swap_error']}")
            time.sleep(0.5)
    raise click.ClickException(f"the server did not swap to {version} within {SWAP_TIMEOUT_S} s (log: {log})")


def publish_policy(model: str, registry: Path, console: Console) -> str:
    """Publish ``model`` (a name or path the server understands) as ``calc-policy``, alias production."""
    from tracelearn.registry import Lineage, RegistryError, open_registry
    from tracelearn.serving.model_store import ModelNotFoundError, resolve_model

    try:
        source = resolve_model(model)
        files = source.directory / source.gguf_file if source.gguf_file else source.directory
        store = open_registry(registry)
        published = store.publish("checkpoint", POLICY_NAME, files, lineage=Lineage(base_model=source.model_id),
                                  metadata={"source": model})
        version = published.version
        if store.aliases(POLICY_NAME).get("production") != version.version:
            store.promote(POLICY_NAME, version.version, "production", reason="demo: initial policy")
    except (ModelNotFoundError, RegistryError) as error:
        raise click.ClickException(str(error)) from error
    console.print(f"$ tracelearn registry publish checkpoint {POLICY_NAME} {files} --alias production", style="dim")
    console.print(f"published [bold]{version.ref}[/] ({version.format}, sha256 {version.digest[:12]}) "
                  f"in {registry}; production -> {version.version}")
    return f"{version.ref} ({source.model_id})"


def load_example_pipeline() -> PipelineConfig:
    """``examples/calc/pipeline.yaml`` with no watermark wait.

    Its reward function is the module path ``examples.calc.reward:score``; ``examples/`` is not part of
    the installed package, so the repository root goes on ``sys.path`` (appended: the installed
    packages keep precedence) for the config's import to find it, as ``PYTHONPATH=.`` would from the
    repository root. The watermark is zero because the agent process has exited and flushed: no
    span of these rollouts can still arrive.
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    return dataclasses.replace(load_config(EXAMPLE_PIPELINE), watermark=WatermarkConfig(lateness_seconds=0.0))


def load_demo_train_config(size: DemoSize) -> TrainConfig:
    config = load_train_config(EXAMPLE_TRAIN_CONFIG)
    if size.epochs is None:
        return config
    return with_overrides(config, {"sft.epochs": size.epochs, "grpo.epochs": size.epochs})


def collect(base_url: str, data: Path, workdir: Path, size: DemoSize, console: Console) -> None:
    """Run the agent on the training tasks under ``opentelemetry-instrument``; its spans land in ``data``."""
    from tracelearn.training.evaluate import EvaluationError, read_task_ids, run_agent

    command = [sys.executable, str(EXAMPLE_AGENT), "--tasks", str(EXAMPLE_TASKS), "--model", POLICY_NAME,
               "--concurrency", "16", "--samples", str(size.train_samples), "--seed", str(COLLECT_SEED)]
    if size.train_tasks is not None:
        command += ["--limit", str(size.train_tasks)]
    env = {**os.environ, "TRACELEARN_DATA": str(data), "OTEL_SERVICE_NAME": "calc-agent",
           "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "not-needed"}
    tasks = len(read_task_ids(EXAMPLE_TASKS, size.train_tasks)[0])
    agent = EXAMPLE_AGENT.relative_to(REPO_ROOT)
    console.print(f"$ opentelemetry-instrument --traces_exporter tracelearn python {agent} --samples "
                  f"{size.train_samples} ... ({tasks} tasks x {size.train_samples} samples)", style="dim")
    try:
        run_agent(command, env, workdir / "agent.log", AGENT_TIMEOUT_S, tasks * size.train_samples, console)
    except EvaluationError as error:
        raise click.ClickException(str(error)) from error


def show_transitions(data: Path, workdir: Path, config: PipelineConfig, console: Console) -> None:
    """Build transitions from the captured spans and print their statistics; writes ``report.png``."""
    with console.status("building rollouts and credited transitions..."):
        result = build_transitions(data, data, config)
    render_build(result, console)
    if not result.transitions_files:
        raise click.ClickException("the build wrote no transitions; see the summary above")
    console.rule("[bold]what the transitions say: tracelearn transitions stats --plot")
    frame, chosen = scan_transitions(data, result.config_hash)
    stats = transition_stats(frame, chosen)
    render_transition_stats(stats, console)
    report = plot_transitions(transition_distributions(frame), stats.groups, workdir / "report.png")
    console.print(f"wrote {report}")


def train(trainer: str, data: Path, run: Path, config: TrainConfig, console: Console) -> Any:
    """Train in this process (the idle server uses no CPU meanwhile); returns the TrainResult."""
    from tracelearn.cli.train import render_result
    from tracelearn.training.data import NoTrainingDataError
    from tracelearn.training.grpo import train_grpo
    from tracelearn.training.sft import train_sft

    console.print(f"$ tracelearn train {trainer} --transitions {data} --model registry:{POLICY_NAME}@production "
                  f"--out {run} --config {EXAMPLE_TRAIN_CONFIG.relative_to(REPO_ROOT)}", style="dim")
    function = train_sft if trainer == "sft" else train_grpo
    try:
        result = function(data, f"registry:{POLICY_NAME}@production", run, config)
    except NoTrainingDataError as error:
        raise click.ClickException(f"nothing to train on: {error}") from error
    render_result(result, console)
    return result


def gate(result: Any, registry: Path, base_url: str, workdir: Path, size: DemoSize,
         console: Console) -> tuple[Any, Any, Any, Any]:
    """Publish the candidate, evaluate production (live server) and the candidate on the same held-out
    tasks and seeds, decide and apply; returns (candidate version, production eval, candidate eval, decision)."""
    from tracelearn.registry import open_registry
    from tracelearn.training.evaluate import EvalSpec, compare, evaluate_model, results_table, write_evaluations
    from tracelearn.training.gate import GateConfig, apply_gate, decide, publish_candidate

    store = open_registry(registry)
    candidate = publish_candidate(store, POLICY_NAME, result.checkpoint, result.lineage)
    console.print(f"published [bold]{candidate.ref}[/] ({candidate.format}) with its lineage; candidate -> "
                  f"{candidate.version}")
    spec = EvalSpec(tasks=HELDOUT_TASKS, samples=size.eval_samples, seed=EVAL_SEED, limit=size.eval_tasks,
                    concurrency=16)
    current = store.resolve(f"{POLICY_NAME}@production")
    production = evaluate_model(POLICY_NAME, spec, workdir / "eval" / "production", base_url=base_url,
                                console=console)
    # The live server reports the version it serves (calc-policy@1+<digest>): name the evaluation after
    # it, so the gate can check that production has not moved since.
    if not (production.model_version or "").startswith(f"{current.ref}+"):
        raise click.ClickException(f"the live server answered as {production.model_version}, not {current.ref}")
    production = dataclasses.replace(production, registry_version=current.ref)
    trained = evaluate_model(f"registry:{candidate.ref}", spec, workdir / "eval" / "candidate",
                             registry=str(registry), console=console)
    comparison = compare(trained, production)
    write_evaluations(workdir / "eval", [production, trained], comparison)
    decision = apply_gate(store, POLICY_NAME, candidate.version, decide(trained, production, GateConfig()))
    decision.write(workdir / "eval" / "gate.json")
    console.print(results_table([production, trained], comparison))
    console.print(("[bold green]promoted[/]: " if decision.promote else "[bold yellow]not promoted[/]: ")
                  + decision.reason)
    return candidate, production, trained, decision


def plot_demo(production: Any, trained: Any, metrics: list[dict[str, Any]], path: Path) -> Path:
    """Held-out success before/after with 95% intervals, and the training loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rates = [production.success_rate, trained.success_rate]
    errors = [[r - i[0] for r, i in zip(rates, (production.interval, trained.interval), strict=True)],
              [i[1] - r for r, i in zip(rates, (production.interval, trained.interval), strict=True)]]
    left.bar(["before (production)", "after (trained)"], rates, yerr=errors, capsize=8,
             color=["tab:gray", "tab:green"])
    left.set_ylim(0, 1)
    left.set_title(f"held-out success, {production.n} rollouts each (95% CI)")
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    right.plot(steps, [m.get("loss") for m in metrics], marker="o")
    right.set_title("training loss per optimizer step")
    right.set_xlabel("step")
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@click.command()
@click.option("--quick", is_flag=True, help="A few tasks and samples per step (CI smoke run, about 3 minutes).")
@click.option("--model", default="smollm2", show_default=True, help="Policy model to start from.")
@click.option("--trainer", type=click.Choice(["sft", "grpo"]), default="sft", show_default=True,
              help="sft: rejection sampling on the rewarded replies (learns fastest here); grpo: policy gradient.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the run's data goes (default: runs/demo-<time>).",
)
def demo(quick: bool, model: str, trainer: str, workdir: Path | None) -> None:
    """The whole loop: capture an unmodified agent, build transitions, train, gate, serve the new policy."""
    # Imported here: the serving extra (fastapi, uvicorn) is not needed by the other subcommands.
    from tracelearn.serving.http_server import free_port
    from tracelearn.training.evaluate import EvaluationError, console_script, stop_server, wait_until_ready

    # Wide enough for the evaluation table when the output is a log file, not a terminal.
    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.monotonic()
    size = QUICK if quick else FULL
    try:  # before anything runs: a broken config should not cost a capture first
        config = load_example_pipeline()
        train_config = load_demo_train_config(size)
    except (PipelineConfigError, TrainConfigError) as exc:
        raise click.ClickException(f"invalid example config: {exc}") from exc
    workdir = workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    registry = workdir / "registry"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"

    console.rule("[bold]1. publish the policy to the registry and serve its production alias")
    policy = publish_policy(model, registry, console)
    server_log_path = workdir / "server.log"
    server_log = server_log_path.open("wb")
    server = subprocess.Popen(
        [console_script("tracelearn"), "serve", "--model", f"registry:{POLICY_NAME}@production", "--port", str(port),
         "--served-model-name", POLICY_NAME, "--max-batch-size", "16", "--watch-interval", "1"],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TRACELEARN_REGISTRY": str(registry)},
    )
    try:
        try:
            with console.status("loading the policy model into the embedded server..."):
                wait_until_ready(base_url, server, server_log_path, SERVER_READY_TIMEOUT_S)
        except EvaluationError as error:
            raise click.ClickException(str(error)) from error
        console.print(f"policy [bold]{policy}[/] served at {base_url} (log: {server_log_path})")

        console.rule("[bold]2. run the agent under opentelemetry-instrument (agent code unchanged)")
        collect(base_url, data, workdir, size, console)
        render_stats(spans_stats(data), console)

        console.rule(f"[bold]3. spans -> transitions: tracelearn transitions build --config {EXAMPLE_PIPELINE.name}")
        show_transitions(data, workdir, config, console)

        console.rule(f"[bold]4. train: {trainer.upper()} on the transitions (LoRA, CPU)")
        os.environ["TRACELEARN_REGISTRY"] = str(registry)  # the trainer resolves registry:calc-policy@production
        result = train(trainer, data, workdir / "runs" / trainer, train_config, console)

        console.rule("[bold]5. publish the candidate, evaluate it against production on held-out tasks, gate")
        candidate, production, trained, decision = gate(result, registry, base_url, workdir, size, console)

        console.rule("[bold]6. the live server follows the production alias")
        if decision.promote:
            from tracelearn.serving.registry_models import registry_model_version

            version = registry_model_version(candidate)
            waited = wait_for_version(base_url, version, server, server_log_path, console)
            console.print(f"the server at {base_url} now answers with [bold]{version}[/] ({waited:.1f} s after "
                          "the promotion; requests in flight finished on the old weights)")
        else:
            console.print("production did not move; the server keeps serving the previous version")
    finally:
        stop_server(server)
        server_log.close()
    plot = plot_demo(production, trained, result.run.read_metrics(), workdir / "demo.png")
    console.print(f"held-out success: before {100 * production.success_rate:.1f}% -> after "
                  f"{100 * trained.success_rate:.1f}% ({production.n} rollouts each, same tasks and seeds); "
                  f"plot: {plot}")
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {workdir}")
