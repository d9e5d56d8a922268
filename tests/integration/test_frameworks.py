"""Framework coverage: real agents run as subprocesses under ``opentelemetry-instrument``.

The plain OpenAI SDK agent (sync, async, streaming; tool calls over several turns) and a two-role
LangGraph agent talk to a real local OpenAI-compatible server that returns vLLM-shaped token ids;
the tests read back the Parquet dataset the agents' processes wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from support.scripted_llm_server import ScriptedLLMServer, detokenize, prompt_ids

from tracelearn.pipelines.llm_calls import attach_token_ids
from tracelearn.pipelines.spans_input import scan_spans

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CALC_AGENT = REPO / "examples" / "calc" / "agent.py"
LANGGRAPH_AGENT = Path(__file__).parent / "agents" / "langgraph_writer_checker.py"


def run_instrumented(tmp_path: Path, server: ScriptedLLMServer, *argv: str) -> pa.Table:
    env = {
        **os.environ,
        "TRACELEARN_DATA": str(tmp_path / "data"),
        "OTEL_SERVICE_NAME": "agent-under-test",
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "not-needed",
    }
    result = subprocess.run(
        [str(VENV_BIN / "opentelemetry-instrument"), sys.executable, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return attach_token_ids(scan_spans(tmp_path / "data")).collect().to_arrow()


def rows(table: pa.Table, span_type: str) -> list[dict[str, Any]]:
    selected = table.filter(pc.equal(table.column("span_type"), span_type))
    return selected.drop_columns(["start_time", "end_time", "events"]).to_pylist()


def request_of(server: ScriptedLLMServer, response_id: str) -> dict[str, Any]:
    number = int(response_id.rsplit("-", 1)[1])
    return server.requests[number - 1].body


@pytest.mark.parametrize(
    "mode", [[], ["--stream"], ["--async"], ["--async", "--stream"], ["--concurrency", "2"]], ids=str
)
def test_openai_sdk_agent_calls_tools_and_lands_exact_token_ids(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer, mode: list[str]
) -> None:
    spans = run_instrumented(tmp_path, scripted_llm_server, str(CALC_AGENT), "--limit", "2", *mode)
    llm = rows(spans, "llm")
    assert len(llm) == 4, "two tasks, each a tool call then an answer"
    for call in llm:
        request = request_of(scripted_llm_server, call["response_id"])
        assert call["token_ids_status"] == "server"
        assert call["prompt_token_ids"] == prompt_ids(request["messages"])
        assert len(call["response_token_ids"]) == len(call["response_logprobs"]) > 0
        # Streaming calls carry no usage unless the agent asks for it; when they do, it agrees.
        assert call["output_tokens"] in (None, len(call["response_token_ids"]))
        assert all(lp <= 0 for lp in call["response_logprobs"])
        assert json.loads(call["input_messages"])[-1]["role"] in ("user", "tool")
    answers = [c for c in llm if json.loads(c["output_messages"])[0].get("content")]
    for answer in answers:
        assert detokenize(answer["response_token_ids"]) == json.loads(answer["output_messages"])[0]["content"]
    tool_calls = [c for c in llm if json.loads(c["output_messages"])[0].get("tool_calls")]
    assert len(tool_calls) == 2
    assert json.loads(tool_calls[0]["output_messages"])[0]["tool_calls"][0]["function"]["name"] == "calculator"
    second_turns = [c for c in llm if json.loads(c["input_messages"])[-1]["role"] == "tool"]
    assert len(second_turns) == 2, "the tool result travels into the next call (multi-turn)"
    rewards = rows(spans, "reward")
    assert len(rewards) == 2 and {r["reward_name"] for r in rewards} == {"correct"}
    assert len({c["rollout_id"] for c in llm}) == 2, "one trace per task is one rollout"
    tasks = {r["task_id"] for r in rows(spans, "other") if r["task_id"]}
    assert tasks == {"calc-001", "calc-002"}


def test_langgraph_two_agents_are_named_and_their_token_ids_join(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    spans = run_instrumented(
        tmp_path, scripted_llm_server, str(LANGGRAPH_AGENT), "What is 2 plus 3?", "What is 4 plus 4?"
    )
    llm = rows(spans, "llm")
    assert sorted(c["agent_name"] for c in llm) == ["checker", "checker", "writer", "writer"]
    assert len({c["rollout_id"] for c in llm}) == 2, "each graph invocation is its own trace and rollout"
    for call in llm:
        request = request_of(scripted_llm_server, call["response_id"])
        assert call["token_ids_status"] == "server"
        assert call["prompt_token_ids"] == prompt_ids(request["messages"])
        assert json.loads(call["input_messages"])[0]["role"] == "system"
