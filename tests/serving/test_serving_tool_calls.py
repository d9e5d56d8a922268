"""Tool calls end to end: a tiny model taught to call ``get_weather`` answers through the real server."""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from support.tiny_model import Lesson, build_tiny_model

from tracelearn.models import load_model, resolve_model
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app

WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}
ASK: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenAI, GenerationEngine]]:
    directory = build_tiny_model(tmp_path_factory.mktemp("models") / "tool-caller",
                                 lessons=[Lesson(ASK, CALL_TEXT, [WEATHER]), Lesson(ASK, CALL_TEXT)])
    engine = GenerationEngine(load_model(resolve_model(str(directory)), device="cpu"))
    with BackgroundServer(create_app(engine)) as server:
        yield OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0), engine
    engine.close()


def test_tool_call_comes_back_as_openai_tool_calls(tool_server: tuple[OpenAI, GenerationEngine]) -> None:
    client, engine = tool_server
    response = client.chat.completions.create(model=engine.model_id, messages=ASK, tools=[WEATHER], temperature=0,
                                              max_tokens=64, extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    # The token ids are what the model generated: the raw call text and the end-of-turn token.
    token_ids = choice.model_extra["token_ids"]
    assert engine.tokenizer.decode(token_ids, skip_special_tokens=True) == CALL_TEXT
    assert token_ids[-1] == engine.tokenizer.eos_token_id


def test_streamed_tool_call(tool_server: tuple[OpenAI, GenerationEngine]) -> None:
    client, engine = tool_server
    chunks = [c for c in client.chat.completions.create(model=engine.model_id, messages=ASK, tools=[WEATHER],
                                                         temperature=0, max_tokens=64, stream=True) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert content == "Checking. "
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_the_same_text_as_content(tool_server: tuple[OpenAI, GenerationEngine]) -> None:
    client, engine = tool_server
    # The model was also taught to write the call without tools in its prompt: with tool_choice "none"
    # the text must come back verbatim, not parsed.
    response = client.chat.completions.create(model=engine.model_id, messages=ASK, tools=[WEATHER],
                                              tool_choice="none", temperature=0, max_tokens=64)
    assert response.choices[0].message.content == CALL_TEXT
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"
