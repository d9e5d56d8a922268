"""``tracelearn eval``: the calc agent scored against scripted servers, the comparison, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner
from support.calc_example import CALC_AGENT, CALC_PIPELINE, HELD_OUT
from support.scripted_llm_server import Reply, ScriptedLLMServer, default_script

from tracelearn.cli.main import main

# What tracelearn eval needs besides --model: nothing defaults to the repository's example.
CALC = {"--agent": " ".join(CALC_AGENT), "--config": str(CALC_PIPELINE), "--tasks": str(HELD_OUT)}


def with_calc(arguments: list[str]) -> list[str]:
    """``arguments`` and the calc example's --agent/--config/--tasks where they do not say otherwise."""
    return [*arguments, *(word for flag, value in CALC.items() if flag not in arguments for word in (flag, value))]


def wrong_answers(body: dict[str, Any]) -> Reply:
    reply = default_script(body)
    return reply if reply.tool_calls else Reply(text="-1")


def test_eval_json_prints_the_document_it_writes(scripted_llm_server: ScriptedLLMServer, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["eval", *with_calc(["--model", "scripted-model", "--base-url",
                                                           scripted_llm_server.base_url, "--limit", "2", "--samples",
                                                           "2", "--seed", "9", "--out", str(tmp_path), "--json"])])

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "eval.json").read_text())
    (evaluation,) = printed["evaluations"]
    assert (evaluation["n"], evaluation["successes"], evaluation["success_rate"]) == (4, 4, 1.0)
    assert evaluation["spec"]["seed"] == 9 and printed["comparison"] is None
    rollouts = pl.read_parquet(tmp_path / "eval_rollouts.parquet")
    assert rollouts.select("task_id", "sample").rows() == [("held-001", 0), ("held-001", 1), ("held-002", 0),
                                                           ("held-002", 1)]


@pytest.mark.slow
def test_eval_compares_two_versions_on_the_same_tasks_and_seeds(tmp_path: Path) -> None:
    with ScriptedLLMServer(model="right") as right, ScriptedLLMServer(wrong_answers, model="wrong") as wrong:
        result = CliRunner().invoke(main, ["eval", *with_calc(["--model", "right", "--base-url", right.base_url,
                                                               "--compare-with", "wrong", "--compare-base-url",
                                                               wrong.base_url, "--limit", "2", "--samples", "2",
                                                               "--out", str(tmp_path)])], env={"COLUMNS": "160"})
        seeds = [{body["seed"] for body in server.chat_requests()} for server in (right, wrong)]

    assert result.exit_code == 0, result.output
    assert seeds[0] == seeds[1] and len(seeds[0]) > 1, "each (task, sample, turn) seeded alike on both"
    assert "agent: rollouts reported" in result.output  # progress while the agent ran
    assert "100.0% [" in result.output and "0.0% [0.0%," in result.output
    assert "+100.0 pts [" in result.output and "only right succeeded on 4" in result.output
    document = json.loads((tmp_path / "eval.json").read_text())
    assert [e["model"] for e in document["evaluations"]] == ["right", "wrong"]
    assert document["comparison"]["only_a"] == 4 and document["comparison"]["difference"] == 1.0
    assert (tmp_path / "1-right" / "data").is_dir() and (tmp_path / "2-wrong" / "data").is_dir()
    rollouts = pl.read_parquet(tmp_path / "eval_rollouts.parquet")
    assert rollouts.group_by("model").agg(pl.col("success").sum()).sort("model").rows() == [("right", 4), ("wrong", 0)]


def one_line_error(arguments: list[str]) -> str:
    result = CliRunner().invoke(main, ["eval", *with_calc(arguments)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_errors_are_one_line(scripted_llm_server: ScriptedLLMServer, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder, runs/eval-<time>, stays out of the checkout
    url = scripted_llm_server.base_url
    assert "missing.jsonl: cannot read the tasks file" in one_line_error(
        ["--model", "scripted-model", "--base-url", url, "--tasks", str(tmp_path / "missing.jsonl")])
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"id": "a", "question": "?", "answer": "1"}\n{"id": \n')
    assert "malformed.jsonl:2: not JSON" in one_line_error(
        ["--model", "scripted-model", "--base-url", url, "--tasks", str(malformed)])
    assert "agent command not found: 'no-such-agent-7'" in one_line_error(
        ["--model", "scripted-model", "--base-url", url, "--agent", "no-such-agent-7 --fast"])
    assert "does not serve 'gpt-9' (it serves: scripted-model)" in one_line_error(
        ["--model", "gpt-9", "--base-url", url])
    assert "no artifact named 'calc-policy'" in one_line_error(
        ["--model", "registry:calc-policy@production", "--registry", str(tmp_path / "registry")])
    assert "no-such-model" in one_line_error(["--model", str(tmp_path / "no-such-model")])
    assert "success_threshold must be a finite number" in one_line_error(["--model", "m", "--threshold", "nan"])
    assert scripted_llm_server.chat_requests() == [], "nothing ran"


def test_a_model_server_that_fails_to_start_is_a_one_line_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')

    line = one_line_error(["--model", str(broken), "--limit", "1", "--out", str(tmp_path / "eval")])

    # The server's last words, and where the rest is.
    assert "the model server exited with code 1 before it was ready: " in line
    assert line.endswith(f"(log: {tmp_path / 'eval' / '1-broken-model' / 'server.log'})")


@pytest.mark.parametrize("flag", ["--agent", "--config", "--tasks"])
def test_the_agent_its_config_and_its_tasks_are_named_explicitly(flag: str) -> None:
    """Installed from a wheel there is no examples/ to default to: each is a required option."""
    arguments = ["eval", "--model", "m", *(word for name, value in CALC.items() if name != flag
                                           for word in (name, value))]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and f"Missing option '{flag}'" in result.output, result.output
