"""``opentelemetry-instrument`` picks up our distro, configurator and exporter with no other package."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracelearn.cli.main import main

VENV_BIN = Path(sys.executable).parent

AGENT = """
import tracelearn
from opentelemetry import trace
messages = '[{"role":"user","parts":[{"type":"text","content":"What is 2+2?"}]}]'
for i in range(3):  # no rollout(): one trace is one rollout, task id from the first user message
    with trace.get_tracer("a").start_as_current_span("chat", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "m", "gen_ai.input.messages": messages,
            "gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 2}):
        tracelearn.emit_reward(float(i == 0))
print("agent ran")
"""


def run_agent(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    return subprocess.run(
        [str(VENV_BIN / "opentelemetry-instrument"), *args, sys.executable, str(script)],
        env={**os.environ, "TRACELEARN_DATA": str(tmp_path / "data"), "OTEL_SERVICE_NAME": "calc", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_spans_land_and_stats_summarize_them_with_no_exporter_flag(tmp_path: Path) -> None:
    result = run_agent(tmp_path)  # the distro makes tracelearn the default traces exporter
    assert result.returncode == 0 and "agent ran" in result.stdout, result.stderr
    stats = CliRunner().invoke(main, ["spans", "stats", str(tmp_path / "data"), "--json"])
    assert stats.exit_code == 0, stats.output
    figures = json.loads(stats.output)
    assert figures["rollouts"] == 3
    assert figures["tasks"] == 1  # same first user message -> same derived task id
    assert figures["llm_calls"] == 3
    assert (figures["input_tokens"], figures["output_tokens"]) == (21, 6)
    assert figures["rollouts_with_reward"] == 3
    assert abs(figures["mean_primary_reward"] - 1 / 3) < 1e-9
    assert figures["services"] == ["calc"]
    human = CliRunner().invoke(main, ["spans", "stats", str(tmp_path / "data")])
    assert "LLM calls per agent and model" in human.output


def test_bad_settings_turn_capture_off_with_one_clear_line_and_the_agent_runs(tmp_path: Path) -> None:
    result = run_agent(tmp_path, "--traces_exporter", "tracelearn", TRACELEARN_ROLL_SECONDS="soon")
    assert result.returncode == 0 and "agent ran" in result.stdout
    assert "capture is off for this process: TRACELEARN_ROLL_SECONDS='soon' is not a number" in result.stderr
    assert "Traceback" not in result.stderr


def test_stats_on_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["spans", "stats", str(tmp_path / "nowhere")])
    assert result.exit_code != 0
    assert "no such file or directory" in result.output


def test_demo_without_the_model_says_how_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACELEARN_MODEL_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "tracelearn models fetch" in result.output
