"""The on-policy loop with real processes: ``tracelearn loop`` serving a tiny random model from a filesystem
registry, the calc agent under ``opentelemetry-instrument``, the collector sidecar, GRPO, held-out
evaluations and the gate; interrupted and resumed, and stopped by bad input without losing earlier rounds.

The tiny model never solves a task, so the pipeline's reward function is a test one: the parity of the
answer's length (rollouts of a task score differently: a learning signal) or always 0 (none).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from support.scripted_llm_server import Reply, ScriptedError, ScriptedLLMServer
from support.tiny_model import build_tiny_model

from tracelearn.processes import free_port
from tracelearn.registry import open_registry
from tracelearn.training.loop import LoopContext, LoopError, RoundState, prepare_loop, run_step
from tracelearn.training.loop_spec import load_loop_spec

REPO = Path(__file__).resolve().parents[2]
CALC = REPO / "examples" / "calc"
TRACELEARN = str(Path(sys.executable).parent / "tracelearn")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat-model")


def write_loop(folder: Path, model: Path, *, reward: str = "length_parity", agent: str | None = None,
               capture: str = "sidecar") -> Path:
    """A loop.yaml (with its tasks, pipeline and train config) in ``folder`` for the tiny model."""
    folder.mkdir(parents=True, exist_ok=True)
    products = [json.loads(line) for line in (CALC / "products.jsonl").read_text().splitlines()]
    (folder / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in products[:4]))
    (folder / "held.jsonl").write_text("".join(json.dumps(t) + "\n" for t in products[4:7]))
    (folder / "pipeline.yaml").write_text(yaml.safe_dump({
        "reward": {"function": f"support.loop_rewards:{reward}", "name": "correct", "missing": "drop"},
        "advantage": {"method": "grpo", "group_by": "task_id", "normalize_std": True, "level": "rollout"},
    }))
    (folder / "train.yaml").write_text(yaml.safe_dump({
        "grpo": {"learning_rate": 1.0e-3, "epochs": 1, "mini_batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }))
    spec = {
        "name": "calc-policy", "model": str(model),
        "agent": agent or f"python {CALC / 'agent.py'} --max-tokens 16 --concurrency {{concurrency}}",
        "collect": {"tasks": "train.jsonl", "samples": 4, "seed": 11},
        "evaluate": {"tasks": "held.jsonl", "samples": 2, "seed": 5},
        "pipeline": "pipeline.yaml", "train": "train.yaml", "concurrency": 8, "capture": capture,
    }
    path = folder / "loop.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def loop_env() -> dict[str, str]:
    # The test reward functions are imported from tests/ (support.loop_rewards).
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
            "COLUMNS": "200"}


def run_loop_cli(config: Path, workdir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRACELEARN, "loop", "--config", str(config), "--workdir", str(workdir), *extra],
                          env=loop_env(), capture_output=True, text=True, timeout=timeout, check=False)


def production(workdir: Path) -> int | None:
    return open_registry(workdir / "registry").aliases("calc-policy").get("production")


@pytest.mark.slow
def test_an_interrupted_loop_resumes_where_it_was_and_a_dead_server_stops_the_next_round(
    tiny_model: Path, tmp_path: Path
) -> None:
    config, workdir = write_loop(tmp_path / "spec", tiny_model), tmp_path / "loop"
    command = [TRACELEARN, "loop", "--config", str(config), "--workdir", str(workdir), "--rounds", "1"]
    first = subprocess.Popen(command, env=loop_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = workdir / "rounds" / "01" / "run"
    deadline = time.monotonic() + 600
    while not run.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the loop ended before training: {first.communicate()[0][-3000:]}"
    first.send_signal(signal.SIGINT)  # Ctrl-C while round 1 trains
    output = first.communicate(timeout=120)[0]
    assert first.returncode != 0, output[-2000:]
    interrupted = RoundState.load(workdir, 1)
    assert list(interrupted.steps) == ["collect", "build"] and not interrupted.settled
    collected = (workdir / "rounds" / "01" / "agent.log").stat().st_mtime_ns

    resumed = run_loop_cli(config, workdir, "--rounds", "1")

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    state = RoundState.load(workdir, 1)
    assert list(state.steps) == ["collect", "build", "train", "publish", "evaluate", "gate"]
    assert state.outcome in ("promoted", "not_promoted")
    assert (workdir / "rounds" / "01" / "agent.log").stat().st_mtime_ns == collected, "collection was redone"
    assert state.steps["build"]["rollouts"] == 16 and state.steps["train"]["trained"]
    gate = json.loads((workdir / "rounds" / "01" / "gate" / "gate.json").read_text())
    assert gate["candidate"] == "calc-policy@2" and gate["production"] == "calc-policy@1"
    assert (gate["promote"], production(workdir)) in ((True, 2), (False, 1))
    assert {p.name for p in (workdir / "evals").iterdir()} == {"calc-policy@1", "calc-policy@2"}
    assert (workdir / "loop.png").stat().st_size > 0
    rows = json.loads((workdir / "loop_rounds.json").read_text())
    assert [row["number"] for row in rows] == [0, 1]
    assert rows[0]["production_eval"]["n"] == 6 and "tool_call_rate" in rows[0]["production_eval"]
    promoted = production(workdir)

    dead = f"http://127.0.0.1:{free_port()}/v1"
    stopped = run_loop_cli(config, workdir, "--rounds", "2", "--base-url", dead, timeout=300)

    assert stopped.returncode == 1
    assert f"round 2, step collect: the model server at {dead} does not answer" in stopped.stderr
    assert "earlier rounds and their promoted versions are kept" in stopped.stderr
    assert production(workdir) == promoted and RoundState.load(workdir, 1).steps == state.steps
    assert not RoundState.load(workdir, 2).steps


@pytest.mark.slow
def test_an_agent_that_crashes_stops_the_loop_with_the_reason(tiny_model: Path, tmp_path: Path) -> None:
    crash = f"{sys.executable} -c 'import sys; sys.exit(\"no API key for the tool service\")'"
    config, workdir = write_loop(tmp_path / "spec", tiny_model, agent=crash, capture="exporter"), tmp_path / "loop"

    result = run_loop_cli(config, workdir, "--rounds", "2", timeout=300)

    assert result.returncode == 1
    assert "round 1, step collect: the agent exited with code 1: no API key for the tool service" in result.stderr
    assert production(workdir) == 1 and not RoundState.load(workdir, 1).steps


@pytest.mark.slow
def test_a_collection_whose_model_calls_fail_stops_the_loop_with_the_first_error(
    tiny_model: Path, tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    def overloaded(body: dict[str, Any]) -> Reply:
        raise ScriptedError(503, "the model server is overloaded")

    scripted_llm_server.script = overloaded
    config, workdir = write_loop(tmp_path / "spec", tiny_model, capture="exporter"), tmp_path / "loop"

    result = run_loop_cli(config, workdir, "--rounds", "1", "--base-url", scripted_llm_server.base_url, timeout=300)

    assert result.returncode == 1, result.stdout[-3000:]
    assert re.search(r"round 1, step build: 16 of 16 collected rollouts failed \(more than 50%\); the first error: "
                     r".*overloaded", result.stderr), result.stderr
    assert production(workdir) == 1 and list(RoundState.load(workdir, 1).steps) == ["collect"]


@pytest.mark.slow
@pytest.mark.parametrize("runner", [[], ["--airflow"]], ids=["cli", "airflow-dag"])
def test_rounds_without_learning_signal_train_nothing_and_say_so(tiny_model: Path, tmp_path: Path,
                                                                  runner: list[str]) -> None:
    config, workdir = write_loop(tmp_path / "spec", tiny_model, reward="always_zero"), tmp_path / "loop"

    result = run_loop_cli(config, workdir, "--rounds", "2", *runner, timeout=600)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for number in (1, 2):
        state = RoundState.load(workdir, number)
        assert state.outcome == "no_signal" and list(state.steps) == ["collect", "build", "train"]
        assert state.reason is not None and state.reason.startswith("no learning signal: in all 4 task groups")
        assert not (state.path / "run").exists()
    assert production(workdir) == 1 and len(open_registry(workdir / "registry").versions("calc-policy")) == 1
    rows = json.loads((workdir / "loop_rounds.json").read_text())  # production measured once, for the baseline
    assert [row["production_eval"]["success_rate"] for row in rows] == [0.0, 0.0, 0.0]
    if runner:
        assert "task train: success" in result.stdout
    else:
        assert "round 1: no_signal: no learning signal" in result.stdout


@pytest.mark.slow
def test_a_candidate_that_fails_its_evaluation_is_never_promoted(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_loop_spec(write_loop(tmp_path / "spec", tiny_model, capture="exporter"))
    workdir = tmp_path / "loop"
    console = Console(file=io.StringIO())
    registry = prepare_loop(spec, workdir, console)
    context = LoopContext(spec, workdir, registry, console, progress=False)
    monkeypatch.setenv("PYTHONPATH", loop_env()["PYTHONPATH"])  # the reward worker imports support.loop_rewards
    for step in ("collect", "build", "train", "publish"):
        run_step(context, 1, step)
    candidate = registry.resolve("calc-policy@candidate")
    weights = next(p for p in registry.local_path(candidate).rglob("*.safetensors"))
    weights.chmod(0o644)
    weights.write_bytes(b"not weights")  # a damaged checkpoint: the server refuses to load it

    with pytest.raises(LoopError, match=r"round 1, step evaluate: the candidate calc-policy@2 failed its "
                                        r"evaluation and is not promoted"):
        run_step(context, 1, "evaluate")

    assert production(workdir) == 1
    assert not (workdir / "rounds" / "01" / "gate" / "gate.json").exists()
    assert "evaluate" not in RoundState.load(workdir, 1).steps
