"""``tracelearn demo``: the learning loop end to end on the embedded defaults (no GPU, no network, no accounts).

1. publish the policy (SmolLM2-135M-Instruct) to a registry in the run's folder as ``calc-policy``,
   alias ``production``, and serve ``registry:calc-policy@production`` (the server follows the alias);
2. start the collector sidecar and run the bundled calculator agent under ``opentelemetry-instrument``
   (agent code unchanged) on the training tasks, several samples per task, exporting standard OTLP to
   the sidecar; stop the sidecar (SIGTERM flushes) and show what landed in the spans dataset;
3. run the Airflow DAGs once with ``dag.test()`` (a throwaway ``AIRFLOW_HOME``, no scheduler):
   ``tracelearn_build_transitions`` (spans -> credited transitions with ``examples/calc/pipeline.yaml``,
   whose reward function re-scores every rollout from the gold answer the agent recorded) and
   ``tracelearn_train`` (SFT on the rewarded replies by default, or GRPO; LoRA, CPU; publish the
   checkpoint as ``candidate`` with its lineage; evaluate it and production on the held-out tasks
   with the same seeds; gate: promote only if the candidate beats production);
4. wait for the live server to swap to the promoted version, re-run the agent on the held-out tasks
   through it, and print the before/after table and ``demo.png`` (held-out success with intervals,
   training loss).

``--quick`` runs a few tasks and samples of each step (the CI smoke run, about three minutes).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from tracelearn.cli.airflow_local import DagRequest, TaskProgress, run_dags
from tracelearn.cli.spans import render_stats
from tracelearn.cli.transitions import render_stats as render_transition_stats
from tracelearn.pipelines.config import PipelineConfigError, load_config
from tracelearn.pipelines.plots import plot_transitions
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.pipelines.stats import scan_transitions, transition_distributions, transition_stats
from tracelearn.processes import ChildProcess, ChildProcessError, console_script, free_port, start_child
from tracelearn.training.config import TrainConfigError, load_train_config
from tracelearn.training.evaluate import ModelServerError, model_cards

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
DAGS_TIMEOUT_S = 3 * 3600
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


def _models_answer(base_url: str) -> bool:
    try:
        model_cards(base_url, timeout_s=2.0)
    except ModelServerError:
        return False
    return True


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for_version(base_url: str, version: str, server: ChildProcess, console: Console) -> float:
    """Poll the server's ``/health`` until it serves ``version`` (its model_version); returns the seconds taken."""
    health = base_url.removesuffix("/v1") + "/health"
    started = time.monotonic()
    with console.status(f"waiting for the live server to load and swap in {version} ..."):
        while time.monotonic() - started < SWAP_TIMEOUT_S:
            if server.returncode is not None:
                raise click.ClickException(f"the model server exited; its log ends with:\n{server.tail(15)}")
            try:
                state = _get_json(health)
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                state = {}
            if state.get("model_version") == version:
                return time.monotonic() - started
            if state.get("last_swap_error"):
                raise click.ClickException(f"the server refused the promoted version: {state['last_swap_error']}")
            time.sleep(0.5)
    raise click.ClickException(f"the server did not swap to {version} within {SWAP_TIMEOUT_S} s")


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


def write_demo_train_config(size: DemoSize, path: Path) -> Path:
    """``examples/calc/train.yaml`` with the demo size's epochs, validated, written to ``path`` for the DAG."""
    document = yaml.safe_load(EXAMPLE_TRAIN_CONFIG.read_text(encoding="utf-8"))
    if size.epochs is not None:
        for trainer in ("grpo", "sft"):
            document.setdefault(trainer, {})["epochs"] = size.epochs
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    load_train_config(path)
    return path


def start_collector(data: Path, workdir: Path, console: Console) -> tuple[ChildProcess, str]:
    """``tracelearn collector serve`` on a free loopback port; returns the process and its OTLP/HTTP URL once ready."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [console_script("tracelearn"), "collector", "serve", "--data", str(data),
               "--http", url.removeprefix("http://"), "--grpc", ""]
    console.print(f"$ tracelearn collector serve --data {data} --http {url.removeprefix('http://')}", style="dim")
    process = start_child(command, name="the collector", log=workdir / "collector.log")

    def ready() -> bool | None:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                return True if response.status == 200 else None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    try:
        process.wait_until(ready, 60, "it was ready")
    except ChildProcessError as error:
        raise click.ClickException(str(error)) from None
    return process, url


def stop_collector(process: ChildProcess, url: str, workdir: Path) -> dict[str, Any]:
    """SIGTERM (the sidecar writes what it holds to Parquet and exits); returns its last ``/status``."""
    status: dict[str, Any] = _get_json(f"{url}/status")
    code = process.stop(grace_s=120)
    if code != 0:
        raise click.ClickException(f"the collector exited with {code}; its log ends with:\n{process.tail(20)}")
    return status


def collect(base_url: str, collector_url: str, workdir: Path, size: DemoSize, console: Console) -> None:
    """Run the agent on the training tasks under ``opentelemetry-instrument``, exporting OTLP to the sidecar."""
    from tracelearn.training.evaluate import EvaluationError, read_task_ids, run_agent

    command = [sys.executable, str(EXAMPLE_AGENT), "--tasks", str(EXAMPLE_TASKS), "--model", POLICY_NAME,
               "--concurrency", "16", "--samples", str(size.train_samples), "--seed", str(COLLECT_SEED)]
    if size.train_tasks is not None:
        command += ["--limit", str(size.train_tasks)]
    env = {**os.environ, "OTEL_SERVICE_NAME": "calc-agent", "OTEL_TRACES_EXPORTER": "otlp",
           "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": collector_url,
           "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "not-needed"}
    tasks = len(read_task_ids(EXAMPLE_TASKS, size.train_tasks)[0])
    agent = EXAMPLE_AGENT.relative_to(REPO_ROOT)
    console.print(f"$ OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT={collector_url} opentelemetry-instrument "
                  f"python {agent} --samples {size.train_samples} ... ({tasks} tasks x {size.train_samples} samples)",
                  style="dim")
    try:
        run_agent(command, env, workdir / "agent.log", AGENT_TIMEOUT_S, tasks * size.train_samples, console,
                  traces_exporter="otlp")
    except EvaluationError as error:
        raise click.ClickException(str(error)) from error


class TrainingTail:
    """Prints each optimizer step as the DAG's training task appends it to ``<runs>/*/metrics.jsonl``."""

    def __init__(self, runs: Path, console: Console) -> None:
        self._runs, self._console = runs, console
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="training-tail", daemon=True)

    def __enter__(self) -> TrainingTail:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._print_new()

    def _follow(self) -> None:
        while not self._stop.wait(2.0):
            self._print_new()

    def _print_new(self) -> None:
        for path in sorted(self._runs.glob("*/metrics.jsonl")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for line in lines[self._seen:]:
                try:
                    step = json.loads(line)
                except ValueError:  # the trainer is mid-write; the next poll sees the whole line
                    return
                numbers = ", ".join(f"{key} {value:.4g}" for key, value in step.items()
                                    if key in ("loss", "kl", "clip_fraction", "reward", "learning_rate")
                                    and isinstance(value, int | float))
                self._console.print(f"    train step {step.get('step', self._seen + 1)}: {numbers}", highlight=False)
                self._seen += 1


def run_pipeline_dags(data: Path, registry: Path, workdir: Path, trainer: str, train_config: Path, size: DemoSize,
                      console: Console) -> Path:
    """``tracelearn_build_transitions`` then ``tracelearn_train`` with ``dag.test()``; returns the training run."""
    lateness = load_config(EXAMPLE_PIPELINE).watermark.lateness_seconds
    # The agent has exited and the sidecar has flushed: no span of these rollouts can still arrive, so
    # the watermark is put past the lateness allowance and every rollout is closed.
    watermark = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + lateness + 1))
    runs = workdir / "runs"
    requests = [
        DagRequest("tracelearn_build_transitions",
                   {"data": str(data), "config": str(EXAMPLE_PIPELINE), "watermark": watermark}),
        DagRequest("tracelearn_train", {
            "transitions": str(data), "registry": str(registry), "runs": str(runs), "name": POLICY_NAME,
            "trainer": trainer, "train_config": str(train_config), "eval_tasks": str(HELDOUT_TASKS),
            "eval_samples": size.eval_samples, "eval_seed": EVAL_SEED, "eval_limit": size.eval_tasks or 0,
            "eval_concurrency": 16,
            "eval_pipeline": str(EXAMPLE_PIPELINE), "margin": 0.0,
        }),
    ]
    log_path = workdir / "airflow.log"
    console.print(f"$ airflow dags test tracelearn_build_transitions; airflow dags test tracelearn_train "
                  f"(AIRFLOW_HOME={workdir / 'airflow'}, log: {log_path})", style="dim")
    progress = TaskProgress()

    def show(line: str) -> None:
        if message := progress.message(line):
            console.print(f"  task {message}", highlight=False)
        elif line.startswith(("serving ", "running ")):  # the evaluate task's own progress lines
            console.print(f"    {line}", highlight=False)

    # examples.calc.reward (the pipeline's reward function) is imported by module path from the repository
    # root; COLUMNS keeps the tasks' progress lines from being wrapped at 80 characters.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "TRACELEARN_REGISTRY": str(registry), "COLUMNS": "200"}
    with TrainingTail(runs, console):
        try:
            result = run_dags(workdir / "airflow", requests, env=env, timeout=DAGS_TIMEOUT_S, log_path=log_path,
                              on_line=show)
        except ChildProcessError as error:
            raise click.ClickException(str(error)) from error
    if not result.succeeded:
        raise click.ClickException(f"a DAG run failed ({[(r.dag_id, r.state) for r in result.runs]}); "
                                   f"{log_path} ends with:\n{log_tail(log_path, 30)}")
    (run,) = [path for path in runs.iterdir() if (path / "summary.json").exists()]
    return run


def show_transitions(data: Path, workdir: Path, console: Console) -> None:
    """The statistics of the transitions the DAG built; writes ``report.png``."""
    frame, chosen = scan_transitions(data, None)
    stats = transition_stats(frame, chosen)
    render_transition_stats(stats, console)
    report = plot_transitions(transition_distributions(frame), stats.groups, workdir / "report.png")
    console.print(f"wrote {report}")


def evaluate_live(base_url: str, workdir: Path, size: DemoSize, console: Console) -> Any:
    """The agent on the held-out tasks through the live server (which follows the production alias)."""
    from tracelearn.training.evaluate import EvalSpec, EvaluationError, evaluate_model

    spec = EvalSpec(tasks=HELDOUT_TASKS, samples=size.eval_samples, seed=EVAL_SEED, limit=size.eval_tasks,
                    concurrency=16)
    try:
        return evaluate_model(POLICY_NAME, spec, workdir / "eval" / "live", base_url=base_url, console=console)
    except EvaluationError as error:
        raise click.ClickException(str(error)) from error


def before_after_table(gate_dir: Path, live: Any) -> tuple[Table, dict[str, Any], dict[str, Any]]:
    """The DAG's evaluations of production and the candidate, then the live server's; returns the table
    and the production and candidate evaluation records."""
    document = json.loads((gate_dir / "eval.json").read_text(encoding="utf-8"))
    decision = json.loads((gate_dir / "gate.json").read_text(encoding="utf-8"))
    by_version = {e["registry_version"]: e for e in document["evaluations"]}
    production, candidate = by_version[decision["production"]], by_version[decision["candidate"]]
    table = Table(title="held-out success (same tasks and seeds)")
    for column in ("", "model", "success", "95% interval", "rollouts"):
        table.add_column(column)
    rows = [("before: production (DAG evaluate)", production["registry_version"], production["success_rate"],
             production["interval_95"], production["n"]),
            ("candidate (DAG evaluate)", candidate["registry_version"], candidate["success_rate"],
             candidate["interval_95"], candidate["n"]),
            ("after: the live server", live.model_version or live.model, live.success_rate, list(live.interval),
             live.n)]
    for label, model, rate, (low, high), n in rows:
        table.add_row(label, model, f"{100 * rate:.1f}%", f"[{100 * low:.1f}, {100 * high:.1f}]", str(n))
    comparison = document.get("comparison")
    if comparison:
        table.caption = (f"candidate - production, paired over {comparison['pairs']} rollouts: "
                         f"{100 * comparison['difference']:+.1f} points "
                         f"[{100 * comparison['interval_95'][0]:+.1f}, {100 * comparison['interval_95'][1]:+.1f}]")
    return table, production, candidate


def plot_demo(rates: list[tuple[str, float, list[float]]], metrics: list[dict[str, Any]], path: Path) -> Path:
    """Held-out success before/after with 95% intervals, and the training loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = [rate for _, rate, _ in rates]
    errors = [[rate - low for _, rate, (low, _) in rates], [high - rate for _, rate, (_, high) in rates]]
    left.bar([label for label, _, _ in rates], values, yerr=errors, capsize=8,
             color=["tab:gray", "tab:blue", "tab:green"][: len(rates)])
    left.set_ylim(0, 1)
    left.set_title("held-out success (95% CI)")
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
    # Wide enough for the evaluation table when the output is a log file, not a terminal.
    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.monotonic()
    size = QUICK if quick else FULL
    workdir = workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    workdir = workdir.resolve()
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    # The pipeline's reward function is the module path examples.calc.reward:score and examples/ is not
    # part of the installed package: the repository root goes on sys.path (appended, so installed
    # packages keep precedence), as PYTHONPATH=. from the repository root would; the DAGs get PYTHONPATH.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    try:  # before anything runs: a broken config should not cost a capture first
        load_config(EXAMPLE_PIPELINE)
        train_config = write_demo_train_config(size, workdir / "train.yaml")
    except (PipelineConfigError, TrainConfigError) as exc:
        raise click.ClickException(f"invalid example config: {exc}") from exc
    registry = workdir / "registry"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"

    console.rule("[bold]1. publish the policy to the registry and serve its production alias")
    policy = publish_policy(model, registry, console)
    server_log_path = workdir / "server.log"
    server = start_child(
        [console_script("tracelearn"), "serve", "--model", f"registry:{POLICY_NAME}@production", "--port", str(port),
         "--served-model-name", POLICY_NAME, "--max-batch-size", "16", "--watch-interval", "1"],
        name="the model server",
        log=server_log_path,
        env={**os.environ, "TRACELEARN_REGISTRY": str(registry)},
    )
    try:
        try:
            with console.status("loading the policy model into the embedded server..."):
                server.wait_until(lambda: True if _models_answer(base_url) else None, SERVER_READY_TIMEOUT_S,
                                  "it was ready")
        except ChildProcessError as error:
            raise click.ClickException(str(error)) from error
        console.print(f"policy [bold]{policy}[/] served at {base_url} (log: {server_log_path})")

        console.rule("[bold]2. the collector sidecar, and the agent under opentelemetry-instrument (code unchanged)")
        collector, collector_url = start_collector(data, workdir, console)
        try:
            collect(base_url, collector_url, workdir, size, console)
        finally:
            status = stop_collector(collector, collector_url, workdir)
        rejected = sum(status.get("spans_rejected", {}).values())
        console.print(f"collector: {status.get('spans_accepted', '?')} spans acknowledged (durable), {rejected} "
                      "rejected; stopped with SIGTERM (what it held written to Parquet)", highlight=False)
        render_stats(spans_stats(data), console)

        console.rule(f"[bold]3. Airflow: build transitions ({EXAMPLE_PIPELINE.name}), train {trainer.upper()} "
                     "(LoRA, CPU), publish candidate, evaluate on held-out tasks, gate")
        run = run_pipeline_dags(data, registry, workdir, trainer, train_config, size, console)
        show_transitions(data, workdir, console)
        decision = json.loads((run / "gate" / "gate.json").read_text(encoding="utf-8"))
        console.print(("[bold green]promoted[/]: " if decision["promote"] else "[bold yellow]not promoted[/]: ")
                      + decision["reason"])

        console.rule("[bold]4. the live server follows the production alias; the agent again on held-out tasks")
        if decision["promote"]:
            from tracelearn.registry import open_registry
            from tracelearn.serving.registry_models import registry_model_version

            candidate = open_registry(registry).resolve(decision["candidate"])
            version = registry_model_version(candidate)
            waited = wait_for_version(base_url, version, server, console)
            # The alias moved inside the DAG run: the server may have swapped before this wait began.
            console.print(f"the server at {base_url} now answers with [bold]{version}[/] ({waited:.1f} s after "
                          "the DAG run ended; requests in flight finished on the old weights)")
        else:
            console.print("production did not move; the server keeps serving the previous version")
        live = evaluate_live(base_url, workdir, size, console)
    finally:
        server.stop()
    table, production, trained = before_after_table(run / "gate", live)
    console.print(table)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    plot = plot_demo([("before (production)", production["success_rate"], production["interval_95"]),
                      ("candidate", trained["success_rate"], trained["interval_95"]),
                      ("after (live server)", live.success_rate, list(live.interval))], metrics, workdir / "demo.png")
    console.print(f"held-out success: before {100 * production['success_rate']:.1f}% -> after "
                  f"{100 * live.success_rate:.1f}% ({live.n} rollouts each, same tasks and seeds); plot: {plot}")
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {workdir}")
