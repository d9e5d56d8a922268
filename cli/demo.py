"""``tracelearn demo``: the end-to-end demo on the embedded defaults (no GPU, no network, no accounts).

Today it covers the registry, capture and the experience pipeline: it publishes the policy model to a
registry in the run's folder as ``calc-policy`` (alias ``production``), serves
``registry:calc-policy@production`` with the embedded server (which follows the alias), runs the
bundled calculator agent under ``opentelemetry-instrument`` (agent code unchanged) on the example
tasks, prints what landed in the spans dataset, builds RL transitions from those spans with
``examples/calc/pipeline.yaml`` (its reward function re-scores every rollout from the gold answer the
agent recorded as ``tracelearn.metadata.gold``), and prints the transitions' statistics next to a
``report.png``. Later capabilities extend this same command until it runs the whole loop.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_AGENT = REPO_ROOT / "examples" / "calc" / "agent.py"
EXAMPLE_TASKS = REPO_ROOT / "examples" / "calc" / "tasks.jsonl"
EXAMPLE_PIPELINE = REPO_ROOT / "examples" / "calc" / "pipeline.yaml"
SERVER_READY_TIMEOUT_S = 300
POLICY_NAME = "calc-policy"


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until_ready(url: str, server: subprocess.Popen[bytes], log: Path, console: Console) -> None:
    """Poll ``url`` until it answers 200, failing early (with the server's last words) if it exits."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    with console.status("loading the policy model into the embedded server..."):
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise click.ClickException(
                    f"the model server exited with code {server.returncode}; its log ends with:\n{log_tail(log)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
    raise click.ClickException(f"the model server did not answer {url} within {SERVER_READY_TIMEOUT_S} s")


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


def venv_tool(name: str) -> str:
    """A console script of the running interpreter's environment (not whatever PATH finds first)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise click.ClickException(f"{name} not found; run scripts/bootstrap.sh")
    return found


@click.command()
@click.option("--quick", is_flag=True, help="A few tasks only (CI smoke run, well under 3 minutes).")
@click.option("--model", default="smollm2", show_default=True, help="Policy model to serve.")
@click.option("--tasks", "tasks_path", type=click.Path(exists=True, path_type=Path), default=EXAMPLE_TASKS)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Run at most this many tasks.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the run's data goes (default: runs/demo-<time>).",
)
def demo(quick: bool, model: str, tasks_path: Path, limit: int | None, workdir: Path | None) -> None:
    """Serve the policy, run the example agent under OpenTelemetry, show the captured dataset."""
    # Imported here: the serving extra (fastapi, uvicorn) is not needed by the other subcommands.
    from tracelearn.serving.http_server import free_port

    console = Console()
    try:  # before anything runs: a broken pipeline config should not cost a capture first
        config = load_example_pipeline()
    except PipelineConfigError as exc:
        raise click.ClickException(f"invalid pipeline config: {exc}") from exc
    workdir = workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    limit = limit or (4 if quick else None)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    registry = workdir / "registry"
    console.rule("[bold]1. publish the policy to the registry and serve its production alias")
    policy = publish_policy(model, registry, console)
    server_log = (workdir / "server.log").open("wb")
    server = subprocess.Popen(
        [venv_tool("tracelearn"), "serve", "--model", f"registry:{POLICY_NAME}@production", "--port", str(port)],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TRACELEARN_REGISTRY": str(registry)},
    )
    try:
        wait_until_ready(f"{base_url}/models", server, workdir / "server.log", console)
        console.print(f"policy [bold]{policy}[/] served at {base_url} (log: {workdir / 'server.log'})")

        console.rule("[bold]2. run the agent under opentelemetry-instrument (agent code unchanged)")
        command = [
            venv_tool("opentelemetry-instrument"),
            "--traces_exporter",
            "tracelearn",
            sys.executable,
            str(EXAMPLE_AGENT),
            "--tasks",
            str(tasks_path),
            "--model",
            POLICY_NAME,
            "--concurrency",
            "4",
        ]
        if limit is not None:
            command += ["--limit", str(limit)]
        env = {
            **os.environ,
            "TRACELEARN_DATA": str(data),
            "OTEL_SERVICE_NAME": "calc-agent",
            "OPENAI_BASE_URL": base_url,
            "OPENAI_API_KEY": "not-needed",
        }
        console.print("$ " + " ".join(command[:5]) + " ...", style="dim")
        agent = subprocess.run(command, env=env, check=False)
        if agent.returncode != 0:
            raise click.ClickException(f"the agent exited with code {agent.returncode}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()

    console.rule("[bold]3. what was captured: tracelearn spans stats " + str(data))
    render_stats(spans_stats(data), console)

    console.rule(f"[bold]4. spans -> transitions: tracelearn transitions build --config {EXAMPLE_PIPELINE.name}")
    with console.status("building rollouts and credited transitions..."):
        result = build_transitions(data, data, config)
    render_build(result, console)
    if not result.transitions_files:
        raise click.ClickException("the build wrote no transitions; see the summary above")

    console.rule("[bold]5. what the transitions say: tracelearn transitions stats --plot")
    frame, chosen = scan_transitions(data, result.config_hash)
    stats = transition_stats(frame, chosen)
    render_transition_stats(stats, console)
    if stats.zero_signal_groups:
        console.print(
            f"{stats.zero_signal_groups} GRPO group(s) have no learning signal (one rollout per task, or equal "
            "rewards): their advantages are 0. Training runs several rollouts per task.",
            style="dim",
        )
    report = plot_transitions(transition_distributions(frame), stats.groups, workdir / "report.png")
    console.print(f"wrote {report}")
