"""APO's prompt gateway is a ``tracelearn gateway`` process: it substitutes the candidate, counts, and stops."""

from pathlib import Path

import openai
import pytest
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.registry import open_registry
from tracelearn.training.apo.evaluation import GatewayError, prompt_gateway

MESSAGES = [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "2+2?"}]


def test_the_gateway_process_substitutes_the_candidate_and_reports_its_counts(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    registry = open_registry(tmp_path / "registry")
    version = registry.publish_prompt("calc-system", "Answer with the number only.").version
    with prompt_gateway(scripted_llm_server.base_url, registry, version.ref, tmp_path / "gateway.log") as (url, counts):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        client.chat.completions.create(model="scripted-model", messages=MESSAGES)  # type: ignore[arg-type]
        client.chat.completions.create(model="scripted-model", messages=MESSAGES[1:])  # type: ignore[arg-type]
    assert (counts.chat_calls, counts.substituted) == (2, 1)
    systems = [body["messages"][0]["content"] for body in scripted_llm_server.chat_requests()]
    assert systems == ["Answer with the number only.", "2+2?"]
    with pytest.raises(openai.APIConnectionError):  # the process is gone with the block
        client.chat.completions.create(model="scripted-model", messages=MESSAGES)  # type: ignore[arg-type]


def test_a_gateway_that_cannot_start_is_an_error_naming_its_log(
    tmp_path: Path, scripted_llm_server: ScriptedLLMServer
) -> None:
    registry = open_registry(tmp_path / "registry")
    log = tmp_path / "gateway.log"
    with pytest.raises(GatewayError, match="exited with code 1") as raised:
        with prompt_gateway(scripted_llm_server.base_url, registry, "calc-system@9", log):
            pytest.fail("the gateway cannot serve a prompt the registry lacks")
    assert str(log) in str(raised.value) and "calc-system" in log.read_text()
