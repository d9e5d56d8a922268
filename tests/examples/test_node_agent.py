"""The bundled Node.js agent: OpenTelemetry JS spans sent over OTLP/HTTP to the collector sidecar land
as LLM, tool and reward rows with the agent's rollout identity, and the pipeline builds transitions
from them with ``examples/node/pipeline.yaml``: capture does not depend on the agent's language.

Needs ``node`` and ``examples/node/node_modules`` (``scripts/bootstrap.sh`` runs ``npm ci`` there);
without them the tests are skipped.
"""

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from support.otlp_sidecar import running_sidecar, spans_table, start_sidecar_process
from support.scripted_llm_server import (
    Reply,
    ScriptedLLMServer,
    ScriptedToolCall,
    default_script,
    logprob_of,
    prompt_ids,
    tokenize,
)

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import load_config
from tracelearn.schemas.dataset import read_table

REPO = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = REPO / "examples" / "node"
AGENT = NODE_EXAMPLE / "agent.mjs"
TASKS = REPO / "examples" / "calc" / "tasks.jsonl"


@pytest.fixture
def node() -> str:
    """The node executable; skips the test where node or the example's packages are absent."""
    executable = shutil.which("node")
    if executable is None:
        pytest.skip("node is not installed: the Node.js example cannot run here")
    if not (NODE_EXAMPLE / "node_modules").is_dir():
        pytest.skip("examples/node/node_modules is missing: run scripts/bootstrap.sh (npm ci --prefix examples/node)")
    return executable


def run_agent(node: str, llm_url: str, otlp_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "OPENAI_BASE_URL": llm_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
        "OTEL_SERVICE_NAME": "node-agent",
        **env,
    }
    return subprocess.run(
        [node, str(AGENT), "--tasks", str(TASKS), *args],
        env=environment, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def report_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


class ScriptedSolver:
    """The default tool-calling script, but the third task's first tool call is malformed, and each
    question's second answer is wrong: per task, sample 0 runs before sample 1, so tasks one and two
    get rewards 1 then 0 (GRPO signal) and task three 0 and 0 (the tool error, then the wrong answer)."""

    WRONG = "The answer is 99."

    def __init__(self, malformed_question: str) -> None:
        self.malformed_question = malformed_question
        self.answers: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        messages = body["messages"]
        question = messages[1]["content"]
        if not any(m["role"] == "tool" for m in messages):
            if question == self.malformed_question and not self.answers[question]:
                return Reply(tool_calls=(ScriptedToolCall("calculator", '{"expression": "3 +"}'),))
            return default_script(body)
        with self.lock:
            self.answers[question] += 1
            first = self.answers[question] == 1
        return default_script(body) if first else Reply(text=self.WRONG)


def test_the_calculator_and_the_reward(node: str) -> None:
    script = """
import { calculate, score } from './examples/node/agent.mjs';
const results = {};
for (const e of ['12 + 30', '(1 + 2) * 3', '7 / 2', '-4 + 1', '2 * -3', '1 / 0', '3 +', 'process.exit(3)']) {
  try { results[e] = calculate(e); } catch (error) { results[e] = `error: ${error.message}`; }
}
results.score = ['42', 'The answer is 42.', '40 + 2 = 42', '42 or 43', '', '1,042'].map((a) => score(a, '42'));
console.log(JSON.stringify(results));
"""
    done = subprocess.run(
        [node, "--input-type=module", "-e", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {
        "12 + 30": "42",
        "(1 + 2) * 3": "9",
        "7 / 2": "3.5",
        "-4 + 1": "-3",
        "2 * -3": "-6",
        "1 / 0": "error: division by zero",
        "3 +": "error: unexpected end",
        "process.exit(3)": 'error: unexpected "p"',
        "score": [1, 1, 1, 0, 0, 0],
    }


def test_spans_from_node_land_as_llm_tool_and_reward_rows_and_become_transitions(node: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    tasks = [json.loads(line) for line in TASKS.read_text(encoding="utf-8").splitlines()[:3]]
    solver = ScriptedSolver(malformed_question=tasks[2]["question"])
    sidecar = start_sidecar_process(data)
    try:
        with ScriptedLLMServer(solver) as llm:
            result = run_agent(node, llm.base_url, sidecar.url, "--limit", "3", "--samples", "2", "--seed", "7")
            requests = llm.chat_requests()
    finally:
        shutdown = sidecar.stop()  # SIGTERM: the sidecar rolls every span it acknowledged into Parquet
    assert result.returncode == 0, result.stderr
    assert sidecar.process.returncode == 0 and "shutdown flushed 30 spans" in shutdown, shutdown

    lines = report_lines(result)
    assert [(line["id"], line["sample"], line["reward"]) for line in lines] == [
        (tasks[0]["id"], 0, 1), (tasks[0]["id"], 1, 0),
        (tasks[1]["id"], 0, 1), (tasks[1]["id"], 1, 0),
        (tasks[2]["id"], 0, 0), (tasks[2]["id"], 1, 0),
    ]  # fmt: skip
    assert lines[4]["answer"] == "error: unexpected end" and lines[5]["answer"] == ScriptedSolver.WRONG
    assert len({line["rollout_id"] for line in lines}) == 6
    assert len(requests) == 12 and all(r["return_token_ids"] and r["logprobs"] for r in requests)
    assert len({r["seed"] for r in requests}) == 12, "each task, sample and turn draws its own seed"

    # --- What landed: one trace per rollout, every span carrying the rollout's identity --------------
    rows = spans_table(data).to_pylist()
    assert len(rows) == 30 and {row["service_name"] for row in rows} == {"node-agent"}
    by_rollout: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_rollout[row["rollout_id"]].append(row)
    assert set(by_rollout) == {line["rollout_id"] for line in lines}
    for line in lines:
        spans = by_rollout[line["rollout_id"]]
        assert Counter(s["span_type"] for s in spans) == {"agent": 1, "llm": 2, "tool": 1, "reward": 1}
        assert {s["task_id"] for s in spans} == {line["id"]} and len({s["trace_id"] for s in spans}) == 1
        assert {s["agent_name"] for s in spans} == {"solver"}
        (root,) = [s for s in spans if s["parent_span_id"] is None]
        assert root["span_type"] == "agent" and dict(root["attributes"])["tracelearn.metadata.gold"] == line["gold"]
        assert all(s["parent_span_id"] == root["span_id"] for s in spans if s is not root)

        (reward,) = [s for s in spans if s["span_type"] == "reward"]
        assert (reward["reward_name"], reward["reward"], reward["reward_is_primary"]) == (
            "correct",
            line["reward"],
            True,
        )

        (tool,) = [s for s in spans if s["span_type"] == "tool"]
        tool_attributes = dict(tool["attributes"])
        assert tool["tool_name"] == "calculator" and tool["name"] == "execute_tool calculator"
        malformed = line["id"] == tasks[2]["id"] and line["sample"] == 0
        assert tool["status_code"] == ("ERROR" if malformed else "UNSET")
        assert tool_attributes["gen_ai.tool.call.result"] == ("error: unexpected end" if malformed else line["gold"])

        first, second = sorted((s for s in spans if s["span_type"] == "llm"), key=lambda s: s["start_time"])
        question = next(t["question"] for t in tasks if t["id"] == line["id"])
        assert [m["role"] for m in json.loads(first["input_messages"])] == ["system", "user"]
        assert json.loads(first["input_messages"])[1]["content"] == question
        (call,) = json.loads(first["output_messages"])[0]["tool_calls"]
        assert call["function"]["name"] == "calculator" and call["id"] == tool_attributes["gen_ai.tool.call.id"]
        assert call["function"]["arguments"] == tool_attributes["gen_ai.tool.call.arguments"]
        tool_message = json.loads(second["input_messages"])[-1]
        assert tool_message == {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": tool_attributes["gen_ai.tool.call.result"],
        }
        assert json.loads(second["output_messages"])[0]["content"] == line["answer"]
        assert (first["finish_reason"], second["finish_reason"]) == ("tool_calls", "stop")

        # Token ids exactly as the server generated them, found by the response id it gave.
        for llm_span in (first, second):
            request = requests[int(llm_span["response_id"].rsplit("-", 1)[1]) - 1]
            assert llm_span["token_ids_status"] == "server"
            assert llm_span["prompt_token_ids"] == prompt_ids(request["messages"])
            assert llm_span["response_logprobs"] == pytest.approx(
                [logprob_of(i) for i in llm_span["response_token_ids"]], abs=1e-6
            )
            assert llm_span["input_tokens"] == len(llm_span["prompt_token_ids"])
        assert second["response_token_ids"] == tokenize(line["answer"])

    # --- What the pipeline makes of them -------------------------------------------------------------
    now = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    built = build_transitions(data, tmp_path / "out", load_config(NODE_EXAMPLE / "pipeline.yaml"), now=now)
    summary = built.summary
    assert summary["rollouts"] == 6 and (summary["transitions"], summary["without_token_ids"]) == (12, 0), summary
    assert (summary["groups"], summary["zero_signal_groups"]) == (3, 1), summary
    rollouts = {r["rollout_id"]: r for r in read_table(tmp_path / "out" / "rollouts", "rollouts").to_pylist()}
    transitions = read_table(tmp_path / "out" / "transitions", "transitions").to_pylist()
    assert {t["agent_name"] for t in transitions} == {"solver"}
    assert {t["token_ids_source"] for t in transitions} == {"server"}
    advantages: dict[str, dict[float, set[float]]] = defaultdict(lambda: defaultdict(set))
    for line in lines:
        rollout = rollouts[line["rollout_id"]]
        assert rollout["task_id"] == line["id"] and dict(rollout["rewards"]) == {"correct": line["reward"]}
        steps = sorted((t for t in transitions if t["rollout_id"] == line["rollout_id"]), key=lambda t: t["step_index"])
        assert [t["step_index"] for t in steps] == [0, 1] and {t["reward"] for t in steps} == {line["reward"]}
        assert steps[1]["response_token_ids"] == tokenize(line["answer"])
        advantages[line["id"]][line["reward"]].update(t["advantage"] for t in steps)
    for task in tasks[:2]:
        ((right,), (wrong,)) = advantages[task["id"]][1], advantages[task["id"]][0]
        assert right > 0 > wrong and right == pytest.approx(-wrong)
    assert advantages[tasks[2]["id"]] == {0: {0.0}}, "equal rewards in the group: no signal"


def test_a_server_that_refuses_token_ids_is_asked_once(node: str, tmp_path: Path) -> None:
    with running_sidecar(tmp_path / "data") as sidecar, ScriptedLLMServer(reject_token_ids=True) as llm:
        result = run_agent(node, llm.base_url, sidecar.url, "--limit", "2")
        requests = llm.chat_requests()
    assert result.returncode == 0, result.stderr
    assert [line["reward"] for line in report_lines(result)] == [1, 1], "the agent went on without token ids"
    # The first call asked and was refused, was sent again without the fields; nothing asked after.
    assert ["return_token_ids" in r for r in requests] == [True, False, False, False, False]
    llm_rows = sorted(
        (row for row in spans_table(tmp_path / "data").to_pylist() if row["span_type"] == "llm"),
        key=lambda row: row["start_time"],
    )
    assert [row["token_ids_status"] for row in llm_rows] == ["rejected_by_server"] + ["not_requested"] * 3
    assert all(row["response_token_ids"] is None for row in llm_rows)


def test_spans_the_collector_did_not_take_fail_the_run(node: str, scripted_llm_server: ScriptedLLMServer) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = run_agent(
        node, scripted_llm_server.base_url, unreachable, "--limit", "1", OTEL_EXPORTER_OTLP_TIMEOUT="1000"
    )
    assert report_lines(result)[0]["reward"] == 1, "the agent's work is done and reported"
    assert result.returncode == 1
    assert "5 spans were not delivered to the OTLP endpoint" in result.stderr, result.stderr
