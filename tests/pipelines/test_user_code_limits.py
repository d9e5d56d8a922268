"""User code in the pipeline cannot hang or end a build: reward functions run in a worker process with a
deadline per call, user stages on a thread with a deadline, and ``SystemExit`` / ``KeyboardInterrupt``
from either become the rollout's (or the stage's) error with a message naming the function."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import PipelineConfigError, config_hash, parse_config, reward_sources
from tracelearn.pipelines.reward_calls import STOP_AFTER_TIMEOUTS
from tracelearn.pipelines.rewards import FunctionRewardReport, function_reward_rows, load_reward_function
from tracelearn.pipelines.rollouts import build_rollouts
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.pipelines.stages import StageError

TESTS = Path(__file__).resolve().parents[1]
TRACELEARN = str(Path(sys.executable).parent / "tracelearn")
LATER = at(3600)


def write_tasks(root: Path, behaviours: list[str]) -> list[str]:
    """One rollout per behaviour (its root span carries ``tracelearn.metadata.behaviour``); their ids."""
    factory = SpansFactory(root / "spans")
    for trace, behaviour in enumerate(behaviours, 1):
        attributes = {"tracelearn.task.id": f"t{trace}", "tracelearn.metadata.behaviour": behaviour}
        task = factory.span(trace, "calc.task", 0, 10, attributes=attributes)
        factory.llm(trace, task, 1, "what is 6*7?")
    factory.write()
    return [format(trace, "032x") for trace in range(1, len(behaviours) + 1)]


def apply(root: Path, path: str, timeout_s: float) -> tuple[pl.DataFrame, FunctionRewardReport]:
    spans = scan_spans(root)
    return function_reward_rows(spans, build_rollouts(spans), load_reward_function(path, "score", timeout_s))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def pid_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "pids"
    directory.mkdir()
    monkeypatch.setenv("HOSTILE_PID_DIR", str(directory))
    return directory


def test_a_call_that_hangs_is_stopped_and_counted_and_the_others_are_rewarded(
        tmp_path: Path, pid_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = write_tasks(tmp_path, ["ok", "sleep", "print", "spin", "ok"])
    started = time.monotonic()
    rows, report = apply(tmp_path, "hostile_user_code:misbehave", timeout_s=1.0)
    elapsed = time.monotonic() - started

    assert dict(zip(rows["rollout_id"], rows["reward"], strict=True)) == {ids[0]: 1.0, ids[2]: 0.5, ids[4]: 1.0}
    assert (report.rewarded, report.timeouts, report.errors, report.invalid) == (3, 2, 2, 0)
    stopped = "hostile_user_code:misbehave did not return within 1 s and was stopped"
    assert report.first_failure == f"rollout {ids[1]}: {stopped}"
    assert "2 of 5 rollouts got no reward because it did not return within 1 s" in caplog.text
    assert elapsed < 30, f"two 1 s timeouts took {elapsed:.1f} s"
    hung = [int(path.name) for path in pid_dir.iterdir()]
    assert len(hung) == 2 and not any(alive(pid) for pid in hung), "a worker that hung is still running"


def test_a_function_that_hangs_on_everything_is_given_up_after_a_few_timeouts(
        tmp_path: Path, pid_dir: Path) -> None:
    write_tasks(tmp_path, ["x"] * 12)
    started = time.monotonic()
    rows, report = apply(tmp_path, "hostile_user_code:always_hangs", timeout_s=0.5)
    elapsed = time.monotonic() - started

    assert rows.height == 0 and report.timeouts == report.errors == 12
    assert len(list(pid_dir.iterdir())) == STOP_AFTER_TIMEOUTS, "called again after timeouts in a row"
    assert elapsed < 20, f"12 rollouts of a hanging function took {elapsed:.1f} s"


def test_exit_interrupt_and_a_dead_worker_are_the_rollouts_errors(tmp_path: Path) -> None:
    ids = write_tasks(tmp_path, ["exit", "interrupt", "os_exit", "ok"])
    rows, report = apply(tmp_path, "hostile_user_code:misbehave", timeout_s=30)
    assert rows["rollout_id"].to_list() == [ids[3]]
    assert (report.rewarded, report.errors, report.timeouts) == (1, 3, 0)
    assert report.first_failure == f"rollout {ids[0]}: hostile_user_code:misbehave raised SystemExit: 3"


def build_with(tmp_path: Path, config: dict[str, object]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [TRACELEARN, "transitions", "build", "--spans", str(tmp_path), "--out", str(tmp_path / "out"),
         "--config", str(tmp_path / "pipeline.yaml"), "--lateness-seconds", "0"],
        capture_output=True, text=True, env={**env, "COLUMNS": "200"}, check=False, timeout=300,
    )


def test_the_cli_build_survives_sys_exit_in_a_reward_function_and_says_so(tmp_path: Path) -> None:
    write_tasks(tmp_path, ["exit", "interrupt", "ok", "ok", "print"])
    completed = build_with(tmp_path, {"reward": {"function": "hostile_user_code:misbehave", "name": "score"}})

    assert completed.returncode == 0, completed.stdout + completed.stderr
    output = completed.stdout + completed.stderr
    assert "hostile_user_code:misbehave raised SystemExit: 3" in output
    assert "rollouts rewarded by the function" in output and "grading '42'" in output
    transitions = pl.read_parquet(tmp_path / "out" / "transitions")
    assert transitions.height == 3


def test_the_cli_build_counts_reward_calls_that_timed_out(tmp_path: Path, pid_dir: Path) -> None:
    write_tasks(tmp_path, ["ok", "sleep", "ok"])
    completed = build_with(tmp_path, {"reward": {"function": "hostile_user_code:misbehave", "name": "score"},
                                      "timeouts": {"reward_function_seconds": 1}})

    assert completed.returncode == 0, completed.stdout + completed.stderr
    timed_out = next(line for line in completed.stdout.splitlines() if "of which timed out" in line)
    assert timed_out.strip("│ ").split()[-1] == "1", completed.stdout


def test_the_cli_build_stops_on_a_stage_that_hangs_or_exits_naming_it(tmp_path: Path) -> None:
    write_tasks(tmp_path, ["ok"])
    completed = build_with(tmp_path, {"stages": ["hostile_user_code:hanging_stage"],
                                      "timeouts": {"stage_seconds": 1}})
    assert completed.returncode == 1
    assert "stage 'hostile_user_code:hanging_stage' did not return within 1 s" in completed.stderr
    assert "Traceback" not in completed.stderr

    completed = build_with(tmp_path, {"stages": ["hostile_user_code:exiting_stage"]})
    assert completed.returncode == 1
    assert "stage 'hostile_user_code:exiting_stage' raised SystemExit: 3" in completed.stderr


def test_a_stage_that_hangs_in_process(tmp_path: Path) -> None:
    write_tasks(tmp_path, ["ok"])
    config = parse_config({"stages": ["hostile_user_code:hanging_stage"], "timeouts": {"stage_seconds": 0.5}})
    started = time.monotonic()
    with pytest.raises(StageError, match=r"hanging_stage' did not return within 0\.5 s \(timeouts\.stage_seconds\)"):
        build_transitions(tmp_path, tmp_path / "out", config, now=LATER)
    assert time.monotonic() - started < 20
    assert not (tmp_path / "out" / "transitions").exists()


def test_timeouts_are_configured_checked_and_left_out_of_the_config_hash(tmp_path: Path) -> None:
    reward = {"function": "hostile_user_code:misbehave"}
    plain = parse_config({"reward": reward, "stages": ["hostile_user_code:hanging_stage"]})
    tuned = parse_config({"reward": reward, "stages": ["hostile_user_code:hanging_stage"],
                          "timeouts": {"reward_function_seconds": 5, "stage_seconds": 2.5}})
    assert (plain.timeouts.reward_function_seconds, plain.timeouts.stage_seconds) == (60.0, 60.0)
    assert tuned.stages[0].timeout_s == 2.5
    function = reward_sources(tuned, tmp_path).function
    assert function is not None and function.timeout_s == 5.0
    assert config_hash(plain) == config_hash(tuned)
    for bad, message in [({"reward_function_seconds": 0}, "timeouts.reward_function_seconds: 0 must be a number"),
                         ({"stage_seconds": "1m"}, "timeouts.stage_seconds: '1m' must be a finite number"),
                         ({"build_seconds": 1}, "timeouts.build_seconds: unknown key")]:
        with pytest.raises(PipelineConfigError, match=message):
            parse_config({"timeouts": bad})
