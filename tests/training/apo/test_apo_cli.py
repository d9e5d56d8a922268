"""``tracelearn apo run``: the issue's flags, a clean stop without failures, one-line errors, and a run
interrupted with Ctrl-C that resumes after its last completed round."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from apo_fixtures import EXACT_PROMPT, VAL_TASKS, OptimizerScript, prompt_block
from click.testing import CliRunner
from support.calc_example import CALC_PIPELINE
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.cli.main import main
from tracelearn.registry import Registry

StartOptimizer = Callable[[OptimizerScript], ScriptedLLMServer]
TRACELEARN = Path(sys.executable).with_name("tracelearn")


def arguments(tmp_path: Path, transitions: Path, optimizer_url: str, policy_url: str, *extra: str) -> list[str]:
    """The issue's command, made small: 3 validation tasks, one sample, one edit per round."""
    return ["apo", "run", "--prompt", "calc-system@production", "--registry", str(tmp_path / "registry"),
            "--transitions", str(transitions / "transitions"), "--agent", "python examples/calc/agent.py",
            "--config", str(CALC_PIPELINE),
            "--tasks", str(VAL_TASKS), "--limit", "3", "--policy-url", policy_url, "--optimizer-model", optimizer_url,
            "--rounds", "2", "--beam", "1", "--branch", "1", "--out", str(tmp_path / "apo"), *extra]


def test_the_issue_command_is_what_the_cli_takes() -> None:
    result = CliRunner().invoke(main, ["apo", "run", "--help"])
    assert result.exit_code == 0
    for flag in ("--prompt", "--transitions", "--agent", "--tasks", "--optimizer-model", "--rounds", "--beam",
                 "--branch", "--out", "--max-rollouts", "--max-optimizer-tokens", "--inject", "--gate-tasks"):
        assert flag in result.output


def test_transitions_without_a_failure_are_a_clean_stop(tmp_path: Path, passing_transitions: Path,
                                                        registry: Registry) -> None:
    result = CliRunner().invoke(main, arguments(tmp_path, passing_transitions, "http://127.0.0.1:9/v1",
                                                "http://127.0.0.1:9/v1", "--json"))
    assert result.exit_code == 0, result.output
    assert "nothing to optimize: 0 of 2 rollouts" in result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["stop"] == "no_failures"
    assert not (tmp_path / "apo").exists()


def test_bad_input_is_one_line_and_exit_1(tmp_path: Path, failing_transitions: Path, registry: Registry) -> None:
    result = CliRunner().invoke(main, arguments(tmp_path, failing_transitions, "http://127.0.0.1:9/v1",
                                                "http://127.0.0.1:9/v1", "--max-rollouts", "2"))
    assert result.exit_code == 1
    assert "Error: --max-rollouts 2 does not cover one evaluation (3 tasks x 1 samples = 3 rollouts)" in result.output
    assert "Traceback" not in result.output


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_an_interrupted_run_resumes_after_its_last_completed_round(
        tmp_path: Path, policy: ScriptedLLMServer, failing_transitions: Path, registry: Registry,
        optimizer: StartOptimizer) -> None:
    # Round 2's edit request hangs the first time: that is when the run is interrupted.
    script = OptimizerScript([prompt_block(EXACT_PROMPT), prompt_block(EXACT_PROMPT + " Always."),
                              prompt_block(EXACT_PROMPT + " Always.")],
                             delay=lambda number: 120.0 if number == 2 else 0.0)
    server = optimizer(script)
    command = [str(TRACELEARN), *arguments(tmp_path, failing_transitions, server.base_url, policy.base_url)]
    out = tmp_path / "apo"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[3])
    try:
        _wait_for(lambda: (out / "rounds" / "round-1.json").exists() and script.edit_requests == 2, 120,
                  "round 1 to complete and round 2 to ask for its edit")
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr
    assert f"interrupted; run the same command again to resume {out} after its last completed round" in stderr
    assert not (out / "rounds" / "round-2.json").exists()
    seed_log = out / "evaluations" / "seed" / "agent.log"
    evaluated_before = {path.parent.name: path.stat().st_mtime_ns for path in out.glob("evaluations/*/agent.log")}
    assert set(evaluated_before) == {"seed", "r1.1"}

    second = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[3])

    assert second.returncode == 0, second.stderr
    progress = " ".join(second.stderr.split())  # rich wraps at the width of a terminal it does not have
    assert f"resuming {out}: 1 round(s) of edits done, 6 rollouts" in progress
    assert seed_log.stat().st_mtime_ns == evaluated_before["seed"], "round 0 was not run again"
    assert (out / "evaluations" / "r1.1" / "agent.log").stat().st_mtime_ns == evaluated_before["r1.1"]
    summary = json.loads(second.stdout)
    assert summary["rounds_completed"] == 2 and summary["stop"] == "rounds"
    assert summary["rollouts_run"] == 9, "3 (seed) + 3 (r1.1) before the interruption, 3 (r2.1) after"
    assert [c["id"] for c in json.loads((out / "tree.json").read_text())["candidates"]] == ["seed", "r1.1", "r2.1"]
    assert summary["winner"]["candidate"] == "r1.1", "r2.1 ties r1.1; the earlier find wins the tie"

    changed = subprocess.run([*command[:-2], "--beam", "2", "--out", str(out)], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[3])
    assert changed.returncode == 1
    refusal = " ".join(changed.stderr.split())
    assert "holds an APO run with another configuration (beam: 1 -> 2;" in refusal
    # The winner went to production, so calc-system@production names another seed than this run's.
    assert "prompt: \"calc-system@1\" -> \"calc-system@2\"" in refusal and "--restart" in refusal
