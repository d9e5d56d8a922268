"""An agent that opens no span of its own still lands one rollout per task, and a first build trains on it.

The plain OpenAI-SDK tool agent (``agents/plain_sdk_tool_agent.py``, which imports neither
tracelearn nor OpenTelemetry) runs as a subprocess under ``opentelemetry-instrument`` against the
scripted OpenAI-compatible server, two questions at a time (threads, or asyncio tasks on one
thread), one question asked twice. Every LLM call is its own trace; the pipeline's conversation
rule joins each question's tool-call step and answer step into one rollout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.span_summary import spans_stats
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.schemas import semconv as sc

VENV_BIN = Path(sys.executable).parent
AGENT = Path(__file__).parent / "agents" / "plain_sdk_tool_agent.py"
QUESTIONS = ["What is 12 plus 30?", "What is 7 times 6?", "What is 12 plus 30?", "What is 9 minus 4?"]


def run_agent(tmp_path: Path, server: ScriptedLLMServer, *mode: str) -> list[dict[str, object]]:
    env = {
        **os.environ,
        "TRACELEARN_DATA": str(tmp_path / "data"),
        "OTEL_SERVICE_NAME": "plain-agent",
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "not-needed",
    }
    result = subprocess.run(
        [str(VENV_BIN / "opentelemetry-instrument"), sys.executable, str(AGENT), *mode, *QUESTIONS],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("mode", [["--concurrency", "2"], ["--async"]], ids=["threads", "asyncio"])
def test_plain_sdk_agent_without_a_span_of_its_own_gives_one_rollout_per_task(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer, mode: list[str]
) -> None:
    answers = run_agent(tmp_path, scripted_llm_server, *mode)
    assert [a["answer"] for a in answers] == ["42", "42", "42", "5"] and {a["llm_calls"] for a in answers} == {2}

    spans = scan_spans(tmp_path / "data").collect()
    calls = spans.filter(pl.col("span_type") == "llm")
    assert calls.height == 8 and calls.get_column("trace_id").n_unique() == 8, "each call is its own trace"
    assert calls.get_column("parent_span_id").is_null().all(), "nothing wraps the calls"
    attributes = calls.get_column("attributes").to_list()
    assert all({sc.PROCESS_PID, sc.THREAD_ID} <= set(pairs) for pairs in attributes)

    stats = spans_stats(tmp_path / "data")
    assert (stats.rollouts, stats.tasks, stats.llm_calls) == (4, 3, 8)
    assert stats.rollouts_by_identity == {"conversation": 4}

    # A first build, right after the run, with no config: every conversation has ended, so nothing waits.
    built = build_transitions(tmp_path / "data", tmp_path / "out")
    assert (built.summary["rollouts"], built.summary["deferred"], built.summary["transitions"]) == (4, 0, 8)
    rollouts = pl.read_parquet(built.rollouts_files)
    assert rollouts.get_column("identity").to_list() == ["conversation"] * 4
    assert rollouts.get_column("n_llm_calls").to_list() == [2] * 4
    transitions = pl.read_parquet(built.transitions_files).sort("rollout_id", "step_index")
    for (rollout_id,), steps in transitions.group_by("rollout_id"):
        tool_step, answer_step = steps.sort("step_index").to_dicts()
        assert json.loads(tool_step["response"])[0]["tool_calls"][0]["function"]["name"] == "calculator"
        carried = json.loads(answer_step["prompt_messages"])
        assert carried[-1]["role"] == "tool" and carried[:2] == json.loads(tool_step["prompt_messages"])
        assert tool_step["task_id"] == answer_step["task_id"] and rollout_id == tool_step["trace_id"]
        assert answer_step["token_ids_source"] == "server"
