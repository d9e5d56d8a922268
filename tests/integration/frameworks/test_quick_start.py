"""The README's quick start, as a new user runs it: ``pip install tracelearn`` and nothing else.

In the framework matrix's ``openai-sdk-traceloop`` environment (tracelearn's base install plus the
``openai`` SDK), the plain OpenAI-SDK tool agent that opens no span of its own runs under
``opentelemetry-instrument --traces_exporter tracelearn``; then that environment's own ``tracelearn``
builds transitions with a reward function. Every task is one rollout holding its tool-call step and
its answer step, with messages, the tool's result and the server's token ids, and every LLM call is
one rewarded transition.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from integration.frameworks import envs
from integration.frameworks.matrix import Combination, agent_environment
from support.scripted_llm_server import ScriptedLLMServer, prompt_ids

ENV = "openai-sdk-traceloop"
AGENT = Path(__file__).resolve().parents[1] / "agents" / "plain_sdk_tool_agent.py"
QUESTIONS = ["What is 12 plus 30?", "What is 7 times 6?", "What is 9 minus 4?"]
REWARD_MODULE = '''
def score(answer: str, messages: list) -> float:
    """1.0 when the answer is the tool's result (the last tool message before it)."""
    results = [m["content"] for m in messages if m.get("role") == "tool"]
    return 1.0 if results and results[-1] in answer else 0.0
'''


@pytest.mark.slow
def test_the_quick_start_on_the_base_install_lands_one_rewarded_transition_per_call(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    try:
        envs.create(ENV)
    except envs.EnvSetupError as error:
        pytest.fail(f"environment {ENV}: {error}", pytrace=False)
    bin_dir = envs.env_bin(ENV)
    combination = Combination("openai-sdk", "no-span", "traceloop", ENV, ())
    environment = agent_environment(combination, scripted_llm_server.base_url, tmp_path / "data")
    agent = subprocess.run(
        [str(bin_dir / "opentelemetry-instrument"), "--traces_exporter", "tracelearn", str(bin_dir / "python"),
         str(AGENT), "--concurrency", "3", *QUESTIONS],
        env={**environment, "OPENAI_API_KEY": "not-needed"}, capture_output=True, text=True, timeout=180, check=False,
    )
    assert agent.returncode == 0, agent.stderr
    assert [json.loads(line)["llm_calls"] for line in agent.stdout.splitlines()] == [2, 2, 2]

    (tmp_path / "my_reward.py").write_text(textwrap.dedent(REWARD_MODULE))
    (tmp_path / "pipeline.yaml").write_text("reward: {function: my_reward:score, name: correct}\n")
    build = subprocess.run(
        [str(bin_dir / "tracelearn"), "transitions", "build", "--spans", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--config", str(tmp_path / "pipeline.yaml")],
        cwd=tmp_path, env={**environment, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr

    rollouts = pq.read_table(tmp_path / "out" / "rollouts")
    assert rollouts.num_rows == len(QUESTIONS)
    assert set(rollouts.column("identity").to_pylist()) == {"conversation"}
    assert rollouts.column("n_llm_calls").to_pylist() == [2, 2, 2]
    assert rollouts.column("final_reward").to_pylist() == [1.0, 1.0, 1.0]
    transitions = pq.read_table(tmp_path / "out" / "transitions").to_pylist()
    assert len(transitions) == 2 * len(QUESTIONS) and all(t["reward"] == 1.0 for t in transitions)
    def key(messages: list[dict[str, object]]) -> tuple[object, int]:
        return next(m["content"] for m in messages if m["role"] == "user"), len(messages)

    requests = {key(body["messages"]): body for body in scripted_llm_server.chat_requests()}
    for transition in transitions:
        prompt = json.loads(transition["prompt_messages"])
        response = json.loads(transition["response"])
        body = requests[key(prompt)]
        assert transition["prompt_token_ids"] == prompt_ids(body["messages"])
        assert transition["response_token_ids"] == scripted_llm_server.response_token_ids(body)
        if prompt[-1]["role"] == "tool":  # the answer step: the tool's result is in its prompt
            assert response[0]["content"] == prompt[-1]["content"]
        else:  # the tool-call step
            assert response[0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert pc.all(pc.equal(pq.read_table(tmp_path / "out" / "transitions").column("token_ids_source"), "server"))
