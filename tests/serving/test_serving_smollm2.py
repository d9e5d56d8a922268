"""The real default policy, SmolLM2-135M-Instruct from the model cache, served end to end."""

import time
from collections.abc import Iterator

import pytest
from openai import OpenAI

from tracelearn.models import DEFAULT_MODEL_NAME, FETCH_COMMAND, default_model_path, load_model, resolve_model
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_server() -> Iterator[tuple[BackgroundServer, GenerationEngine]]:
    if not default_model_path().is_file():
        pytest.skip(f"{DEFAULT_MODEL_NAME} is not in the model cache ({default_model_path()}); run {FETCH_COMMAND}")
    started = time.perf_counter()
    loaded = load_model(resolve_model("smollm2"), device="cpu")
    print(f"{DEFAULT_MODEL_NAME} loaded in {time.perf_counter() - started:.1f} s")
    engine = GenerationEngine(loaded)
    with BackgroundServer(create_app(engine, aliases={"smollm2"})) as server:
        yield server, engine
    engine.close()


def test_smollm2_answers_with_exact_tokens(smollm2_server: tuple[BackgroundServer, GenerationEngine]) -> None:
    server, engine = smollm2_server
    client = OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
    response = client.chat.completions.create(
        model="smollm2", messages=MESSAGES,
        max_tokens=24, temperature=0, logprobs=True, extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    assert choice.message.content is not None and "Paris" in choice.message.content
    token_ids = choice.model_extra["token_ids"]
    assert engine.tokenizer.decode(token_ids, skip_special_tokens=True) == choice.message.content
    if choice.finish_reason == "stop":
        assert token_ids[-1] in engine.stop_token_ids  # the end-of-turn token is kept for training
    assert choice.logprobs is not None and len(choice.logprobs.content or []) == len(token_ids)
    assert response.system_fingerprint == engine.model_version
    expected_prompt = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"]
    assert response.model_extra["prompt_token_ids"] == list(expected_prompt)
