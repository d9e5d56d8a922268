"""Evaluation: the statistics against hand-computed values, and real agents under opentelemetry-instrument
scored by the pipeline's reward function, against the scripted server and against ``tracelearn serve``."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import textwrap
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from rich.console import Console
from support.calc_example import HELD_OUT, calc_spec
from support.scripted_llm_server import Reply, ScriptedLLMServer, default_script
from support.tiny_model import build_tiny_model

from tracelearn.training.eval_inputs import (
    AgentError,
    EvaluationError,
    TasksFileError,
    UnknownModelError,
    read_task_ids,
)
from tracelearn.training.eval_results import (
    EvalResult,
    compare,
    paired_difference_interval,
    results_table,
    wilson_interval,
)
from tracelearn.training.evaluate import evaluate_model

Z = 1.96  # the hand computations below use 1.96, not the exact quantile the default uses


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def made_result(label: str, successes: list[bool], *, seed: int = 0, tasks: int | None = None) -> EvalResult:
    """An evaluation whose rollouts are ``successes`` in (task, sample) order, two samples per task."""
    rows = [{"task_id": f"t{i // 2}", "sample": i % 2, "rollout_id": f"{label}-{i}", "status": "ok",
             "reward": float(ok), "success": ok} for i, ok in enumerate(successes)]
    frame = pl.DataFrame(rows, schema={"task_id": pl.String, "sample": pl.Int64, "rollout_id": pl.String,
                                       "status": pl.String, "reward": pl.Float64, "success": pl.Boolean})
    return EvalResult(model=f"registry:{label}", registry_version=label, served_model=label, model_version=None,
                      base_url="http://127.0.0.1:1/v1", spec=calc_spec(seed=seed, samples=2), agent_command=(),
                      tasks=tasks or len(successes) // 2, rollouts=frame, unmatched_rollouts=0,
                      pipeline_config_hash="0" * 64, data_dir=Path("data"), wall_time_s=1.0)


# --- Statistics -------------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 5/10: center (0.5 + 1.9208/10) / 1.38416 = 0.5, half 1.96 sqrt(0.025 + 0.009604) / 1.38416 = 0.263410
    assert wilson_interval(5, 10, Z) == pytest.approx((0.236590, 0.763410), abs=1e-6)
    # 0/10: center = half = 0.19208 / 1.38416 = 0.138770: the interval starts at 0 and is not a point
    assert wilson_interval(0, 10, Z) == pytest.approx((0.0, 0.277540), abs=1e-6)
    assert wilson_interval(10, 10, Z) == pytest.approx((0.722460, 1.0), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_paired_interval_matches_hand_computed_values() -> None:
    # 5 pairs, all won by a: l1 = Wilson(5/5) low = 0.565509, u2 = 1 - l1, phi = 0 (empty margins):
    # lower = 1 - sqrt(2) * 0.434491 = 0.385537, upper = 1. The normal approximation would say [1, 1].
    assert paired_difference_interval(0, 5, 0, 0, Z) == pytest.approx((0.385537, 1.0), abs=1e-5)
    # both 3, only a 2, only b 1, neither 4: p1 0.5 [0.236590, 0.763410], p2 0.4 [0.168178, 0.687330],
    # phi = (12 - 2) / sqrt(5 * 5 * 4 * 6) = 0.408248;
    # lower = 0.1 - sqrt(0.263410^2 - 2 phi 0.263410 * 0.287330 + 0.287330^2) = 0.1 - 0.300243
    # upper = 0.1 + sqrt(0.263410^2 - 2 phi 0.263410 * 0.231822 + 0.231822^2) = 0.1 + 0.270679
    assert paired_difference_interval(3, 2, 1, 4, Z) == pytest.approx((-0.200243, 0.370679), abs=1e-5)


def test_compare_pairs_rollouts_by_task_and_sample() -> None:
    a = made_result("calc-policy@2", [True, True, True, False, True, False, False, False, True, False])
    b = made_result("calc-policy@1", [True, False, True, True, False, False, False, False, True, False])

    comparison = compare(a, b, Z)

    assert (comparison.both, comparison.only_a, comparison.only_b, comparison.neither) == (3, 2, 1, 4)
    assert comparison.pairs == 10 and comparison.difference == pytest.approx(0.1)
    assert (comparison.a_rate, comparison.b_rate) == (0.5, 0.4)
    assert comparison.interval == pytest.approx((-0.200243, 0.370679), abs=1e-5)
    assert comparison.to_dict()["only_a"] == 2 and json.dumps(comparison.to_dict())


def test_compare_reports_rollouts_without_a_partner_and_refuses_different_seeds() -> None:
    a = made_result("calc-policy@2", [True, True, False, True])
    b = made_result("calc-policy@1", [True, False])  # only task t0

    comparison = compare(a, b)
    assert (comparison.pairs, comparison.unpaired_a, comparison.unpaired_b) == (2, 2, 0)
    assert comparison.only_a == 1 and comparison.difference == 0.5

    with pytest.raises(ValueError, match="seed 0 and 7"):
        compare(a, made_result("calc-policy@1", [True, False, True, False], seed=7))


def test_the_table_shows_both_versions_and_their_difference() -> None:
    a = made_result("calc-policy@2", [True, True, True, False, True, False, False, False, True, False])
    b = made_result("calc-policy@1", [True, False, True, True, False, False, False, False, True, False])
    console = Console(file=io.StringIO(), width=160)

    table = results_table([a, b], compare(a, b))
    console.print(table)

    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "calc-policy@2" in text and "calc-policy@1" in text
    assert "50.0% [23.7%, 76.3%]" in text and "40.0% [16.8%, 68.7%]" in text
    assert "+10.0 pts [-20.0, +37.1]" in text
    assert str(table.caption).startswith(
        "paired by (task, sample): only calc-policy@2 succeeded on 2, only calc-policy@1 on 1, both on 3, neither on 4")


# --- Inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a"}\nnot json\n', r"tasks.jsonl:2: not JSON"),
        ('{"id": "a"}\n{"question": "no id"}\n', r'tasks.jsonl:2: a task must be a JSON object with an "id"'),
        ('{"id": "a"}\n\n{"id": "a"}\n', r"tasks.jsonl:3: task id 'a' repeats line 1"),
        ("\n\n", r"tasks.jsonl: the tasks file holds no tasks"),
    ],
)
def test_a_malformed_tasks_file_is_refused_naming_the_line(tmp_path: Path, content: str, message: str) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(content)
    with pytest.raises(TasksFileError, match=message):
        read_task_ids(tasks)


def test_tasks_are_read_up_to_the_limit(tmp_path: Path) -> None:
    ids, lines = read_task_ids(HELD_OUT, limit=3)
    assert ids == ["held-001", "held-002", "held-003"] and json.loads(lines[1])["id"] == "held-002"
    with pytest.raises(TasksFileError, match="cannot read the tasks file"):
        read_task_ids(tmp_path / "missing.jsonl")


# --- End to end with the scripted server --------------------------------------------------------------


def wrong_answers(body: dict[str, Any]) -> Reply:
    """Uses the calculator like the default script, then states a number that is never the result."""
    reply = default_script(body)
    return reply if reply.tool_calls else Reply(text="-1")


@pytest.fixture(scope="module")
def right_answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EvalResult]:
    """The calc agent on 3 held-out tasks x 2 samples against the scripted model that always answers right."""
    with ScriptedLLMServer() as server:
        spec = calc_spec(tasks=HELD_OUT, limit=3, samples=2, seed=5)
        yield evaluate_model(server.model, spec, tmp_path_factory.mktemp("right"), base_url=server.base_url,
                             console=quiet())


def test_every_rollout_of_a_right_answering_model_succeeds(right_answers: EvalResult) -> None:
    result = right_answers
    assert (result.n, result.successes, result.success_rate) == (6, 6, 1.0)
    assert result.rollouts.select("task_id", "sample").rows() == [
        ("held-001", 0), ("held-001", 1), ("held-002", 0), ("held-002", 1), ("held-003", 0), ("held-003", 1)]
    assert result.rollouts["rollout_id"].n_unique() == 6 and result.rollouts["status"].to_list() == ["ok"] * 6
    assert result.rollouts["reward"].to_list() == [1.0] * 6 and result.mean_reward == 1.0
    assert (result.missing_rewards, result.missing_rollouts, result.agent_errors, result.unmatched_rollouts) == (
        0, 0, 0, 0)
    assert result.interval == pytest.approx(wilson_interval(6, 6))
    assert result.served_model == "scripted-model" and result.model_version is None
    # What ran: the three chosen tasks, the seed and samples passed on, the agent's six reports in its log.
    assert len((result.data_dir.parent / "tasks.jsonl").read_text().splitlines()) == 3
    assert result.agent_command[-4:] == ("--samples", "2", "--seed", "5")
    reports = [json.loads(line) for line in (result.data_dir.parent / "agent.log").read_text().splitlines()
               if line.startswith("{")]
    assert sorted((r["id"], r["sample"]) for r in reports) == result.rollouts.select("task_id", "sample").rows()
    summary = result.to_dict()
    assert summary["n"] == 6 and summary["successes"] == 6 and json.dumps(summary)


def test_a_wrong_answering_model_scores_zero_and_loses_every_pair(
    right_answers: EvalResult, tmp_path: Path
) -> None:
    with ScriptedLLMServer(wrong_answers) as server:
        wrong = evaluate_model(server.model, right_answers.spec, tmp_path, base_url=server.base_url, console=quiet())

    assert (wrong.n, wrong.successes) == (6, 0)
    assert wrong.rollouts["reward"].to_list() == [0.0] * 6, "scored by the reward function, not missing"
    assert wrong.missing_rewards == 0
    comparison = compare(right_answers, wrong)
    assert (comparison.pairs, comparison.only_a, comparison.only_b) == (6, 6, 0)
    assert comparison.difference == 1.0 and comparison.interval[0] > 0, "significant even on 6 pairs"


AGENT_WITHOUT_SAMPLES = textwrap.dedent('''
    """Any agent: its own flags, task ids on the root span, no sample attribute; skips and invents tasks."""
    import argparse, json, os
    import openai
    from opentelemetry import trace

    parser = argparse.ArgumentParser()
    parser.add_argument("--file")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    client, tracer = openai.OpenAI(), trace.get_tracer("any-agent")
    tasks = [json.loads(line) for line in open(args.file)]
    for task in tasks + [{"id": "not-in-the-file", "answer": "1"}]:
        if task["id"] == "held-002":
            continue  # crashed on this one: no rollout at all
        for run in range(args.runs):
            attributes = {"tracelearn.task.id": task["id"], "tracelearn.metadata.gold": task["answer"]}
            with tracer.start_as_current_span("any.task", attributes=attributes):
                if task["id"] == "held-003" and run == 0:
                    continue  # gave up before calling the model: nothing to score
                client.chat.completions.create(model=os.environ["OPENAI_MODEL"], seed=args.seed,
                    messages=[{"role": "user", "content": "Say " + task["answer"]}])
            print(json.dumps({"id": task["id"], "run": run}), flush=True)
''')


def test_any_agent_command_with_placeholders_and_its_failures_counted(
    scripted_llm_server: ScriptedLLMServer, tmp_path: Path
) -> None:
    agent = tmp_path / "any_agent.py"
    agent.write_text(AGENT_WITHOUT_SAMPLES)
    spec = calc_spec(agent=("python", str(agent), "--file", "{tasks}", "--runs", "{samples}"), tasks=HELD_OUT,
                    limit=3, samples=2, seed=11)

    result = evaluate_model("scripted-model", spec, tmp_path / "eval", base_url=scripted_llm_server.base_url,
                            console=quiet())

    assert result.agent_command[0] == sys.executable, "'python' is the interpreter with the instrumentations"
    assert result.agent_command[-2:] == ("--seed", "11"), "no {seed} placeholder: appended"
    assert {body["seed"] for body in scripted_llm_server.chat_requests()} == {11}
    rows = {(r["task_id"], r["sample"]): (r["status"], r["reward"], r["success"])
            for r in result.rollouts.iter_rows(named=True)}
    assert rows == {
        ("held-001", 0): ("ok", 1.0, True),  # "You said: Say 10": the last number is the gold 10
        ("held-001", 1): ("ok", 1.0, True),  # samples numbered by start time within the task
        ("held-002", 0): ("missing", None, False),
        ("held-002", 1): ("missing", None, False),
        ("held-003", 0): ("ok", None, False),
        ("held-003", 1): ("ok", 1.0, True),
    }
    assert (result.n, result.successes) == (6, 3)
    assert (result.missing_rollouts, result.missing_rewards, result.unmatched_rollouts) == (2, 1, 2)


def test_a_failing_agent_is_reported_with_its_last_words(scripted_llm_server: ScriptedLLMServer,
                                                          tmp_path: Path) -> None:
    crash = ("python", "-c", "import sys; sys.exit('cannot parse ' + sys.argv[2])")
    spec = calc_spec(agent=crash, tasks=HELD_OUT, limit=1, samples=1)
    with pytest.raises(AgentError, match=r"exited with code 1: cannot parse .*tasks.jsonl \(log: .*agent.log\)"):
        evaluate_model("scripted-model", spec, tmp_path, base_url=scripted_llm_server.base_url, console=quiet())


def test_a_hung_agent_is_killed_after_its_timeout(scripted_llm_server: ScriptedLLMServer, tmp_path: Path) -> None:
    pid_file = tmp_path / "agent.pid"
    hang = ("python", "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            "print('thinking', flush=True); time.sleep(600)")
    # Long enough for opentelemetry-instrument to load the instrumentations on a busy 2-core machine.
    spec = calc_spec(agent=hang, tasks=HELD_OUT, limit=1, samples=1, agent_timeout_s=8)
    with pytest.raises(AgentError, match="ran past its timeout of 8 s and was killed; last line: thinking"):
        evaluate_model("scripted-model", spec, tmp_path / "eval", base_url=scripted_llm_server.base_url,
                       console=quiet())
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_inputs_are_checked_before_anything_runs(scripted_llm_server: ScriptedLLMServer, tmp_path: Path) -> None:
    spec = calc_spec(tasks=HELD_OUT, limit=1, samples=1)
    with pytest.raises(UnknownModelError, match=r"does not serve 'gpt-9' \(it serves: scripted-model\)"):
        evaluate_model("gpt-9", spec, tmp_path / "a", base_url=scripted_llm_server.base_url, console=quiet())
    with pytest.raises(UnknownModelError):
        evaluate_model(str(tmp_path / "no-such-model"), spec, tmp_path / "b", console=quiet())
    with pytest.raises(AgentError, match="agent command not found: 'no-such-agent-7'"):
        evaluate_model("scripted-model", calc_spec(agent=("no-such-agent-7",), tasks=HELD_OUT), tmp_path / "c",
                       base_url=scripted_llm_server.base_url, console=quiet())
    spans = tmp_path / "d" / "data" / "spans" / "date=2026-01-01"
    spans.mkdir(parents=True)
    with pytest.raises(EvaluationError, match="already holds spans; evaluate into a fresh working directory"):
        evaluate_model("scripted-model", spec, tmp_path / "d", base_url=scripted_llm_server.base_url,
                       console=quiet())
    assert scripted_llm_server.chat_requests() == [], "no agent ran"


# --- End to end with tracelearn serve -----------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_model_serves_a_checkpoint_and_records_its_version(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny-policy")
    spec = calc_spec(tasks=HELD_OUT, limit=2, samples=2)

    result = evaluate_model(str(model), spec, tmp_path / "eval", console=quiet())

    assert result.n == 4 and result.tasks == 2
    assert result.served_model == "tiny-policy"
    assert result.model_version is not None and result.model_version.startswith("tiny-policy@")
    assert result.rollouts["reward"].is_not_null().all(), "the reward function scored every reply"
    assert result.successes == result.rollouts["success"].sum()
    assert "loaded tiny-policy@" in (tmp_path / "eval" / "server.log").read_text()
    # The server was stopped: nothing listens on its port any more.
    port = urllib.parse.urlsplit(result.base_url).port
    assert port is not None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
