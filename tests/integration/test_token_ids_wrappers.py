"""Token ids survive other wrappers of the OpenAI client, and capture says when no LLM instrumentation runs.

Real agents (``examples/calc/agent.py``, the plain OpenAI SDK) run as subprocesses under
``opentelemetry-instrument`` against the scripted vLLM-shaped server, with OpenInference's and
Traceloop's OpenAI instrumentations both active (OpenInference wraps ``OpenAI.request`` around the
SDK's original ``request``, the wrapper that used to hide tracelearn's hook), loaded by
``opentelemetry-instrument`` itself or in a chosen order (``agents/instrument_then_run.py``). The
tests read the spans Parquet the agents' processes wrote and compare every call's ids with what the
server sent for that exact request.

Both OpenAI instrumentations register the instrumentor name ``openai``, so with both installed every
``opentelemetry-instrument`` run loads both: the dev environment keeps OpenInference out, and these
runs use the framework matrix's cached ``openai-sdk-openinference`` environment (tracelearn's base
install, which brings Traceloop's, plus OpenInference's).
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from integration.frameworks import envs
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.processes import free_port, start_child
from tracelearn.schemas.dataset import read_table

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
OPENINFERENCE_AND_TRACELOOP_ENV = "openai-sdk-openinference"
CALC_AGENT = REPO / "examples" / "calc" / "agent.py"
INSTRUMENT_THEN_RUN = Path(__file__).parent / "agents" / "instrument_then_run.py"
NO_LLM_INSTRUMENTATION = "with no LLM instrumentation"
HELLO = [{"role": "user", "content": "hello"}]
SPAN_COLUMNS = [
    "name",
    "response_id",
    "token_ids_status",
    "prompt_token_ids",
    "response_token_ids",
    "response_logprobs",
]


def run_agent(
    tmp_path: Path, server: ScriptedLLMServer, argv: list[str], bin_dir: Path = VENV_BIN, **env: str
) -> tuple[list[dict[str, Any]], str]:
    """Run ``argv`` with ``bin_dir``'s Python under its ``opentelemetry-instrument``; the spans it
    wrote (selected columns) and its stderr."""
    result = subprocess.run(
        [str(bin_dir / "opentelemetry-instrument"), str(bin_dir / "python"), *argv],
        env={
            **os.environ,
            "TRACELEARN_DATA": str(tmp_path / "data"),
            "OTEL_SERVICE_NAME": "agent-under-test",
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": "not-needed",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    spans = read_table(tmp_path / "data" / "spans", "spans").select(SPAN_COLUMNS).to_pylist()
    return spans, result.stderr


def assert_every_call_has_the_servers_ids(server: ScriptedLLMServer, spans: list[dict[str, Any]]) -> None:
    """Each request the server got asked for ids, and exactly one span holds exactly the ids it sent."""
    requests = server.requests
    assert requests, "the agent made no LLM call"
    for number, request in enumerate(requests, start=1):
        assert request.body.get("return_token_ids") is True, f"call {number} did not ask for token ids"
        sent = server.completion(request.body, number)  # deterministic: what the server answered
        holders = [s for s in spans if s["response_id"] == sent["id"] and s["token_ids_status"] == "server"]
        assert len(holders) == 1, f"call {number}: {len(holders)} spans hold its ids"
        (holder,) = holders
        assert holder["prompt_token_ids"] == sent["prompt_token_ids"]
        assert holder["response_token_ids"] == sent["choices"][0]["token_ids"]
        expected_logprobs = [entry["logprob"] for entry in sent["choices"][0]["logprobs"]["content"]]
        assert holder["response_logprobs"] == pytest.approx(expected_logprobs)


def spans_named(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == name]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("order", "agent_args"),
    [
        ("", []),  # opentelemetry-instrument loads all three by entry point
        ("openinference,traceloop,token_ids", []),
        ("token_ids,traceloop,openinference", []),
        ("openinference,token_ids,traceloop", ["--stream"]),
        ("traceloop,openinference,token_ids", ["--async", "--stream"]),
    ],
    ids=[
        "auto",
        "openinference-first",
        "token_ids-first",
        "openinference-first-stream",
        "traceloop-first-async-stream",
    ],
)
def test_openinference_and_traceloop_together_every_call_gets_the_servers_ids(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer, order: str, agent_args: list[str]
) -> None:
    agent = [str(CALC_AGENT), "--limit", "2", *agent_args]
    if order:
        argv, env = (
            [str(INSTRUMENT_THEN_RUN), order, *agent],
            {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai,tracelearn_token_ids"},
        )
    else:
        argv, env = agent, {}
    bin_dir = envs.create(OPENINFERENCE_AND_TRACELOOP_ENV) / "bin"  # cached: made once
    spans, stderr = run_agent(tmp_path, scripted_llm_server, argv, bin_dir, **env)

    calls = len(scripted_llm_server.requests)
    assert calls == 4, "two tasks, each a tool call then an answer"
    # Both instrumentations recorded every call: Traceloop's span around OpenInference's.
    assert len(spans_named(spans, "openai.chat")) == calls
    assert len(spans_named(spans, "ChatCompletion")) == calls
    assert_every_call_has_the_servers_ids(scripted_llm_server, spans)
    assert NO_LLM_INSTRUMENTATION not in stderr


@pytest.mark.slow
def test_without_llm_instrumentation_one_log_line_says_what_to_install(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    """Traceloop's (and OpenInference's) OpenAI instrumentation disabled: the ids still land on
    tracelearn's own spans, and one line, once, says why messages are missing and what to do."""
    spans, stderr = run_agent(
        tmp_path,
        scripted_llm_server,
        [str(CALC_AGENT), "--limit", "2"],
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="openai",
    )

    assert not spans_named(spans, "openai.chat") and not spans_named(spans, "ChatCompletion")
    assert len(spans_named(spans, "tracelearn.token_ids")) == len(scripted_llm_server.requests) == 4
    assert_every_call_has_the_servers_ids(scripted_llm_server, spans)
    (line,) = [line for line in stderr.splitlines() if NO_LLM_INSTRUMENTATION in line]
    assert "opentelemetry-instrumentation-openai" in line
    assert "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS" in line


@pytest.mark.slow
def test_the_gateway_under_opentelemetry_instrument_records_each_call_once(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    """The gateway asks for and records token ids itself; the in-process hook, which sees every
    ``httpx`` request in its process, leaves its upstream calls alone."""
    port = free_port()
    command = [str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "tracelearn"), "gateway"]
    command += ["--upstream", scripted_llm_server.base_url, "--port", str(port)]
    lines: list[str] = []
    env = {**os.environ, "TRACELEARN_DATA": str(tmp_path / "data"), "OTEL_SERVICE_NAME": "gateway"}
    with start_child(command, name="gateway", env=env, on_line=lines.append) as gateway:
        base_url = f"http://127.0.0.1:{port}/v1"

        def answers() -> bool | None:
            with contextlib.suppress(httpx2.TransportError):
                return httpx2.get(f"{base_url}/models").status_code == 200 or None
            return None

        gateway.wait_until(answers, timeout_s=120, what="the gateway answering")
        reply = httpx2.post(f"{base_url}/chat/completions", json={"model": "m", "messages": HELLO}, timeout=60)
        assert reply.status_code == 200
        gateway.send_signal(signal.SIGINT)
        assert gateway.wait(timeout_s=60) == 0

    spans = read_table(tmp_path / "data" / "spans", "spans").select(SPAN_COLUMNS).to_pylist()
    assert [(s["name"], s["token_ids_status"]) for s in spans] == [("chat m", "server")]
    assert not [line for line in lines if NO_LLM_INSTRUMENTATION in line]
