"""The embedded server over real HTTP, driven by the real ``openai`` client (tiny random model)."""

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app
from tracelearn.serving.protocol import MODEL_VERSION_HEADER

SERVED_NAME = "tiny-chat"
ALIAS = "tiny-alias"

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 3 plus 4?"},
]
WITH_IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def server(engine: GenerationEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(engine, SERVED_NAME, aliases={ALIAS})) as running:
        yield running


@pytest.fixture
def client(server: BackgroundServer) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)


def template_ids(engine: GenerationEngine, messages: list[Any]) -> list[int]:
    encoded = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)
    return list(encoded["input_ids"])


def decode(engine: GenerationEngine, ids: list[int]) -> str:
    return str(engine.tokenizer.decode(ids, skip_special_tokens=True))


def test_models_and_health(client: OpenAI, server: BackgroundServer, engine: GenerationEngine) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]
    assert models[0].owned_by == "tracelearn"
    health = httpx.get(server.base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200
    assert health.json()["model_version"] == engine.model_version


def test_completion_reports_exact_tokens_logprobs_and_version(client: OpenAI, engine: GenerationEngine) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=16, temperature=0.8, seed=3,
        logprobs=True, top_logprobs=3, extra_body=WITH_IDS,
    )
    assert raw.headers[MODEL_VERSION_HEADER] == engine.model_version
    response = raw.parse()
    choice = response.choices[0]
    prompt_ids = response.model_extra["prompt_token_ids"]
    token_ids = choice.model_extra["token_ids"]
    assert response.system_fingerprint == engine.model_version
    assert prompt_ids == template_ids(engine, MESSAGES)
    assert decode(engine, token_ids) == choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), len(token_ids))
    assert response.usage.total_tokens == len(prompt_ids) + len(token_ids)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == len(token_ids)
    assert all(e.logprob <= 0 for e in entries)
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
    # Byte-level tokens may split a character; their exact bytes still add up to the text.
    raw = b"".join(bytes(e.bytes or []) for e in entries)
    assert raw.decode("utf-8", errors="replace") == engine.tokenizer.decode(token_ids, skip_special_tokens=False)


def test_streaming_carries_prompt_ids_first_and_ids_per_delta(client: OpenAI, engine: GenerationEngine) -> None:
    request: dict[str, Any] = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    whole = client.chat.completions.create(**request, extra_body=WITH_IDS)
    chunks = list(client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}, logprobs=True, extra_body=WITH_IDS
    ))
    assert chunks[0].model_extra["prompt_token_ids"] == template_ids(engine, MESSAGES)
    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in chunks if c.choices]
    streamed_ids = [i for c in token_chunks for i in c.choices[0].model_extra.get("token_ids", [])]
    text = "".join(c.choices[0].delta.content or "" for c in token_chunks)
    assert streamed_ids == whole.choices[0].model_extra["token_ids"]
    assert text == whole.choices[0].message.content == decode(engine, streamed_ids)
    logprob_entries = [e for c in token_chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert len(logprob_entries) == len(streamed_ids)
    assert token_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(streamed_ids)


def test_greedy_is_deterministic_and_seeds_reproduce(client: OpenAI) -> None:
    def ids(**sampling: Any) -> list[int]:
        response = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=12,
                                                  extra_body=WITH_IDS, **sampling)
        return list(response.choices[0].model_extra["token_ids"])

    assert ids(temperature=0) == ids(temperature=0)
    assert ids(temperature=1.0, seed=7) == ids(temperature=1.0, seed=7)
    assert ids(temperature=1.0, seed=7) != ids(temperature=1.0, seed=8)
    assert ids(temperature=0.7, top_p=0.5, seed=1) == ids(temperature=0.7, top_p=0.5, seed=1)


def test_concurrent_requests_are_batched_with_the_same_greedy_outputs(
    client: OpenAI, engine: GenerationEngine
) -> None:
    # Prompts of different lengths, so the batch really is left-padded.
    conversations = [[{"role": "user", "content": "hello " * k + "how are you?"}] for k in range(1, 7)]

    def greedy(messages: list[Any]) -> list[int]:
        response = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=24,
                                                  temperature=0, extra_body=WITH_IDS)
        return list(response.choices[0].model_extra["token_ids"])

    one_by_one = [greedy(m) for m in conversations]
    before = engine.stats()
    with ThreadPoolExecutor(len(conversations)) as pool:
        together = list(pool.map(greedy, conversations))
    after = engine.stats()
    batched_steps = {size: n - before.batch_sizes.get(size, 0) for size, n in after.batch_sizes.items() if size > 1}
    assert sum(batched_steps.values()) > 0, f"no step decoded more than one request: {after.batch_sizes}"
    assert max(s for s, n in batched_steps.items() if n) >= 4
    assert together == one_by_one


def test_async_client_and_n_choices(server: BackgroundServer) -> None:
    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        return list(await asyncio.gather(*(
            client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=8, n=3, seed=s)
            for s in range(3)
        )))

    for response in asyncio.run(run()):
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert response.usage.completion_tokens <= 24


def test_stop_string_ends_the_text_before_it(client: OpenAI) -> None:
    request: dict[str, Any] = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 30, "temperature": 0}
    full = client.chat.completions.create(**request).choices[0].message.content
    assert full is not None and len(full) > 10
    stop = full[6:9]
    stopped = client.chat.completions.create(**request, stop=[stop, "never-generated-string"]).choices[0]
    assert stopped.message.content == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"
    streamed = client.chat.completions.create(**request, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_max_tokens_bounds_the_completion(client: OpenAI) -> None:
    response = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_completion_tokens=3,
                                              extra_body=WITH_IDS)
    ids = response.choices[0].model_extra["token_ids"]
    assert len(ids) <= 3
    assert response.choices[0].finish_reason == ("length" if len(ids) == 3 else "stop")


def test_tools_are_rendered_into_the_prompt(client: OpenAI, engine: GenerationEngine) -> None:
    tools: list[Any] = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]
    response = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, tools=tools, max_tokens=4,
                                              extra_body=WITH_IDS)
    prompt = engine.tokenizer.decode(response.model_extra["prompt_token_ids"])
    assert '"name": "get_weather"' in prompt
    plain = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, tools=tools, tool_choice="none",
                                           max_tokens=4, extra_body=WITH_IDS)
    assert plain.model_extra["prompt_token_ids"] == template_ids(engine, MESSAGES)
    other = {"type": "function", "function": {"name": "get_time"}}
    named = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, tools=[*tools, other], max_tokens=4, extra_body=WITH_IDS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    prompt = engine.tokenizer.decode(named.model_extra["prompt_token_ids"])
    assert "You must call the function get_weather." in prompt and "get_time" not in prompt
    with pytest.raises(openai.BadRequestError, match="get_date"):
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, tools=tools, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "get_date"}})


def test_served_name_model_id_and_aliases_are_accepted_others_are_404(
    client: OpenAI, engine: GenerationEngine
) -> None:
    for name in (SERVED_NAME, ALIAS, engine.model_id):
        assert client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2).model == SERVED_NAME
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert caught.value.body is not None
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": SERVED_NAME}, "messages"),
        ({"model": SERVED_NAME, "messages": "hello"}, "messages"),
        ({"model": SERVED_NAME, "messages": []}, "messages"),
        ({"model": SERVED_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": SERVED_NAME, "messages": [{"role": "user"}]}, "messages.0"),
        ({"messages": MESSAGES}, "model"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 100_000}, "max_tokens"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "n": 0}, "n"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "stop": [""]}, "stop"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": SERVED_NAME, "messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_requests_get_400_with_an_openai_error_body(
    server: BackgroundServer, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]


def test_malformed_json_and_client_errors(server: BackgroundServer, client: OpenAI) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=10_000)
    missing = httpx.get(f"{server.base_url}/no-such-route")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_client_that_disconnects_mid_stream_stops_its_generation(
    server: BackgroundServer, engine: GenerationEngine
) -> None:
    body = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
    full_length = len(client_ids(server, {**body, "stream": False}))
    assert full_length > 100  # greedy runs long enough for an early exit to show
    before = engine.stats().tokens_generated
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(10):  # the role chunk and nine tokens, then hang up
            next(events)
    deadline = time.monotonic() + 5
    while True:  # the engine notices at its next step; then its counters stand still
        settled = engine.stats().tokens_generated
        time.sleep(0.2)
        if engine.stats().tokens_generated == settled:
            break
        assert time.monotonic() < deadline, "generation went on after the client left"
    assert 9 <= settled - before < full_length // 2


def client_ids(server: BackgroundServer, body: dict[str, Any]) -> list[int]:
    response = httpx.post(f"{server.base_url}/chat/completions", json={**body, "return_token_ids": True})
    return list(response.json()["choices"][0]["token_ids"])
