"""The gateway between a real ``openai`` client and real upstreams (scripted server, embedded server).

Spans are captured with the OTel SDK's ``InMemorySpanExporter``; one test lands them in Parquet with
the capture path's own writer and builds transitions from them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import polars as pl
import pytest
from click.testing import CliRunner
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.scripted_llm_server import (
    ScriptedError,
    ScriptedLLMServer,
    default_script,
    logprob_of,
    prompt_ids,
    tokenize,
)

from tracelearn.cli.gateway import gateway as gateway_command
from tracelearn.schemas import semconv as sc
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.gateway import PROMPT_VERSION_HEADER, create_gateway_app
from tracelearn.serving.gateway_prompts import PromptRule
from tracelearn.serving.http_server import BackgroundServer, free_port
from tracelearn.serving.openai_api import create_app
from tracelearn.serving.protocol import MODEL_VERSION_HEADER

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate arithmetic",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]
HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(spans: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider


@pytest.fixture
def scripted() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer() as server:
        yield server


def start_gateway(upstream: str, provider: TracerProvider, **options: Any) -> BackgroundServer:
    return BackgroundServer(create_gateway_app(upstream, tracer_provider=provider, **options)).start()


@pytest.fixture
def gateway(scripted: ScriptedLLMServer, provider: TracerProvider) -> Iterator[BackgroundServer]:
    server = start_gateway(scripted.base_url, provider)
    yield server
    server.stop()


def client_of(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def finished_spans(spans: InMemorySpanExporter, count: int, timeout_s: float = 5.0) -> tuple[ReadableSpan, ...]:
    """The ``count`` spans the gateway recorded. A streamed call's span ends when the gateway's stream
    generator finishes, which can be just after the client has read the last event.
    """
    deadline = time.monotonic() + timeout_s
    while len(finished := spans.get_finished_spans()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(finished) == count, [s.name for s in finished]
    return tuple(finished)


def only_span(spans: InMemorySpanExporter) -> ReadableSpan:
    return finished_spans(spans, 1)[0]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_non_streaming_call_records_the_upstreams_token_ids_and_hides_them_from_the_client(
    gateway: BackgroundServer, scripted: ScriptedLLMServer, spans: InMemorySpanExporter
) -> None:
    response = client_of(gateway).chat.completions.with_raw_response.create(model="scripted-model", messages=HELLO)
    completion = response.parse()

    assert completion.choices[0].message.content == "You said: hello"
    assert completion.choices[0].logprobs is None  # the client did not ask
    assert "prompt_token_ids" not in (completion.model_extra or {})
    assert "token_ids" not in (completion.choices[0].model_extra or {})
    assert response.headers[MODEL_VERSION_HEADER] == "scripted-model"
    sent = scripted.chat_requests()[0]
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    assert sent["messages"] == HELLO

    span = only_span(spans)
    a = attrs(span)
    expected_ids = tokenize("You said: hello")
    assert span.name == "chat scripted-model"
    assert a[sc.GEN_AI_OPERATION_NAME] == "chat" and a[sc.GEN_AI_REQUEST_MODEL] == "scripted-model"
    assert a[sc.GEN_AI_RESPONSE_ID] == completion.id
    assert list(a[sc.PROMPT_TOKEN_IDS]) == prompt_ids(HELLO)
    assert list(a[sc.RESPONSE_TOKEN_IDS]) == expected_ids
    assert list(a[sc.RESPONSE_LOGPROBS]) == pytest.approx([logprob_of(i) for i in expected_ids])
    assert a[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_FROM_SERVER
    assert a[sc.MODEL_VERSION] == "scripted-model"
    assert a[sc.GEN_AI_USAGE_INPUT_TOKENS] == len(prompt_ids(HELLO))
    assert list(a[sc.GEN_AI_RESPONSE_FINISH_REASONS]) == ["stop"]
    assert json.loads(a[sc.GEN_AI_INPUT_MESSAGES])[0] == {
        "role": "system", "parts": [{"type": "text", "content": "You are terse."}]
    }
    output = json.loads(a[sc.GEN_AI_OUTPUT_MESSAGES])
    assert output == [{"role": "assistant", "parts": [{"type": "text", "content": "You said: hello"}],
                       "finish_reason": "stop"}]


def test_a_client_that_asks_for_token_ids_and_logprobs_gets_them(
    gateway: BackgroundServer, spans: InMemorySpanExporter
) -> None:
    completion = client_of(gateway).chat.completions.create(
        model="scripted-model", messages=HELLO, logprobs=True, top_logprobs=1, extra_body={"return_token_ids": True}
    )
    extra = completion.model_extra or {}
    assert extra["prompt_token_ids"] == prompt_ids(HELLO)
    assert (completion.choices[0].model_extra or {})["token_ids"] == tokenize("You said: hello")
    assert completion.choices[0].logprobs is not None and completion.choices[0].logprobs.content
    assert list(attrs(only_span(spans))[sc.RESPONSE_TOKEN_IDS]) == tokenize("You said: hello")


def test_streaming_passes_chunks_through_and_records_the_concatenated_ids(
    gateway: BackgroundServer, spans: InMemorySpanExporter
) -> None:
    chunks = list(client_of(gateway).chat.completions.create(model="scripted-model", messages=HELLO, stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: hello"
    assert all("token_ids" not in (c.choices[0].model_extra or {}) for c in chunks if c.choices)
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
    assert all("prompt_token_ids" not in (c.model_extra or {}) for c in chunks)
    a = attrs(only_span(spans))
    assert list(a[sc.PROMPT_TOKEN_IDS]) == prompt_ids(HELLO)
    assert list(a[sc.RESPONSE_TOKEN_IDS]) == tokenize("You said: hello")
    assert len(a[sc.RESPONSE_LOGPROBS]) == len(a[sc.RESPONSE_TOKEN_IDS])
    assert json.loads(a[sc.GEN_AI_OUTPUT_MESSAGES])[0]["parts"][0]["content"] == "You said: hello"


def test_tool_calls_pass_through_streamed_and_not(gateway: BackgroundServer, spans: InMemorySpanExporter) -> None:
    client = client_of(gateway)
    question = [{"role": "user", "content": "What is 3 plus 4?"}]
    completion = client.chat.completions.create(model="scripted-model", messages=question, tools=TOOLS)  # type: ignore[arg-type]
    calls = completion.choices[0].message.tool_calls or []
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("calculate", {"expression": "3 + 4"})
    ]
    streamed = list(client.chat.completions.create(model="scripted-model", messages=question,  # type: ignore[arg-type]
                                                   tools=TOOLS, stream=True))
    pieces = [call for c in streamed if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert pieces and pieces[0].function and pieces[0].function.name == "calculate"

    for span in finished_spans(spans, 2):
        output = json.loads(attrs(span)[sc.GEN_AI_OUTPUT_MESSAGES])[0]
        assert output["finish_reason"] == "tool_calls"
        assert [p["name"] for p in output["parts"] if p["type"] == "tool_call"] == ["calculate"]


def test_upstream_errors_are_reported_as_they_are(provider: TracerProvider, spans: InMemorySpanExporter) -> None:
    def script(body: dict[str, Any]) -> Any:
        if body["messages"][-1]["content"] == "busy":
            raise ScriptedError(429, "slow down")
        if body["messages"][-1]["content"] == "broken":
            raise ScriptedError(500, "the model crashed")
        return default_script(body)

    with ScriptedLLMServer(script) as upstream:
        server = start_gateway(upstream.base_url, provider)
        try:
            client = client_of(server)
            with pytest.raises(openai.RateLimitError) as busy:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "busy"}])
            assert busy.value.status_code == 429 and "slow down" in busy.value.message
            with pytest.raises(openai.InternalServerError) as broken:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "broken"}], stream=True)
            assert "the model crashed" in broken.value.message
            # Not an upstream error: a path it does not serve, passed through with its status.
            missing = httpx.get(f"{server.base_url}/nowhere")
            assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
        finally:
            server.stop()
    failed = spans.get_finished_spans()
    assert [s.status.status_code for s in failed] == [trace.StatusCode.ERROR] * 2
    assert [attrs(s)["http.response.status_code"] for s in failed] == [429, 500]


def test_models_and_retry_after_headers_pass_through(provider: TracerProvider) -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    upstream_app = FastAPI()

    @upstream_app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]}, headers={"x-extra": "1"})

    @upstream_app.post("/v1/chat/completions")
    async def overloaded() -> JSONResponse:
        body = {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=503, headers={"retry-after": "7"})

    with BackgroundServer(upstream_app) as upstream:
        server = start_gateway(upstream.base_url, provider)
        try:
            listed = client_of(server).models.list()
            assert [m.id for m in listed.data] == ["m"]
            assert httpx.get(f"{server.base_url}/models").headers["x-extra"] == "1"
            answer = httpx.post(f"{server.base_url}/chat/completions", json={"model": "m", "messages": HELLO})
            assert answer.status_code == 503 and answer.headers["retry-after"] == "7"
            assert answer.json()["error"]["message"] == "overloaded"
        finally:
            server.stop()


def test_an_unreachable_upstream_is_a_502_naming_it(provider: TracerProvider, spans: InMemorySpanExporter) -> None:
    upstream = f"http://127.0.0.1:{free_port()}/v1"
    server = start_gateway(upstream, provider)
    try:
        answer = httpx.post(f"{server.base_url}/chat/completions", json={"model": "m", "messages": HELLO})
        assert answer.status_code == 502
        assert upstream in answer.json()["error"]["message"]
        assert httpx.get(f"{server.base_url}/models").status_code == 502
        with pytest.raises(openai.APIStatusError) as streamed:
            client_of(server).chat.completions.create(model="m", messages=HELLO, stream=True)  # type: ignore[arg-type]
        assert streamed.value.status_code == 502
    finally:
        server.stop()
    assert all(attrs(s)["error.type"] == "upstream_unreachable" for s in spans.get_finished_spans())


def test_an_upstream_that_rejects_token_ids_is_asked_once_then_never(
    provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    with ScriptedLLMServer(reject_token_ids=True) as upstream:
        server = start_gateway(upstream.base_url, provider)
        try:
            client = client_of(server)
            for _ in range(2):
                completion = client.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
                assert completion.choices[0].message.content == "You said: hello"
        finally:
            server.stop()
        asked = ["return_token_ids" in body for body in upstream.chat_requests()]
    assert asked == [True, False, False]  # rejected, retried without, then not asked again
    for span in spans.get_finished_spans():
        assert attrs(span)[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_REJECTED
        assert sc.RESPONSE_TOKEN_IDS not in attrs(span)


def test_token_ids_off_and_a_public_upstream_in_auto_are_not_asked(provider: TracerProvider) -> None:
    with ScriptedLLMServer() as upstream:
        server = start_gateway(upstream.base_url, provider, token_ids="off")
        try:
            client_of(server).chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
        finally:
            server.stop()
        assert "return_token_ids" not in upstream.chat_requests()[0]
    gateway_app = create_gateway_app("https://api.example.com/v1")
    assert gateway_app.state.gateway.fields_to_add({"model": "m"}) == []


def test_a_traceparent_continues_the_callers_trace(gateway: BackgroundServer, spans: InMemorySpanExporter) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", "baggage": f"{sc.ROLLOUT_ID}=rollout-7"}
    client_of(gateway).chat.completions.create(model="m", messages=HELLO, extra_headers=headers)  # type: ignore[arg-type]
    client_of(gateway).chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    joined, alone = spans.get_finished_spans()
    assert format(joined.context.trace_id, "032x") == trace_id
    assert joined.parent is not None and format(joined.parent.span_id, "016x") == parent_id
    assert attrs(joined)[sc.ROLLOUT_ID] == "rollout-7"
    assert alone.parent is None and alone.context.trace_id != joined.context.trace_id


def test_embedded_server_upstream_ids_and_model_version(
    engine: GenerationEngine, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    with BackgroundServer(create_app(engine, served_model_name="tiny")) as upstream:
        server = start_gateway(upstream.base_url, provider)
        try:
            client = client_of(server)
            direct = openai.OpenAI(base_url=upstream.base_url, api_key="unused", max_retries=0)
            request = {"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 0.0}
            reference = direct.chat.completions.create(**request, extra_body={"return_token_ids": True})
            raw = client.chat.completions.with_raw_response.create(**request)
            completion = raw.parse()
            streamed = list(client.chat.completions.create(**request, stream=True))
        finally:
            server.stop()
    assert completion.choices[0].message.content == reference.choices[0].message.content
    assert completion.choices[0].logprobs is None
    assert raw.headers[MODEL_VERSION_HEADER] == engine.model_version
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert streamed_text == reference.choices[0].message.content
    for span in finished_spans(spans, 2):
        a = attrs(span)
        assert list(a[sc.PROMPT_TOKEN_IDS]) == (reference.model_extra or {})["prompt_token_ids"]
        assert list(a[sc.RESPONSE_TOKEN_IDS]) == (reference.choices[0].model_extra or {})["token_ids"]
        assert a[sc.MODEL_VERSION] == engine.model_version


def test_prompt_substitution_follows_the_alias(
    tmp_path: Path, scripted: ScriptedLLMServer, provider: TracerProvider, spans: InMemorySpanExporter
) -> None:
    from tracelearn.registry import open_registry

    registry = open_registry(tmp_path / "registry")
    first = registry.publish_prompt("calc-system", "You are a calculator.").version
    second = registry.publish_prompt("calc-system", "Answer with the number only.").version
    registry.promote("calc-system", first.version, "production")
    rules = [PromptRule.parse("calc-policy=calc-system@production")]
    server = start_gateway(scripted.base_url, provider, prompt_rules=rules, registry=registry,
                           prompt_poll_seconds=0.05)
    try:
        client = client_of(server)
        raw = client.chat.completions.with_raw_response.create(model="calc-policy", messages=HELLO)
        assert raw.headers[PROMPT_VERSION_HEADER] == first.ref
        client.chat.completions.create(model="other-model", messages=HELLO)  # type: ignore[arg-type]
        client.chat.completions.create(model="calc-policy", messages=HELLO[1:])  # type: ignore[arg-type]
        registry.promote("calc-system", second.version, "production")
        deadline = time.monotonic() + 5
        while server_prompt(server) != second.ref and time.monotonic() < deadline:
            time.sleep(0.02)
        client.chat.completions.create(model="calc-policy", messages=HELLO)  # type: ignore[arg-type]
        health = httpx.get(f"{server.base_url.removesuffix('/v1')}/health", timeout=5).json()
    finally:
        server.stop()
        server_gateway(server).close()
    assert (health["chat_calls"], health["substituted"]) == (4, 2)
    assert health["prompts"] == {"calc-system@production": second.ref}
    systems = [body["messages"][0]["content"] for body in scripted.chat_requests()]
    assert systems == ["You are a calculator.", "You are terse.", "hello", "Answer with the number only."]
    refs = [attrs(span).get(sc.PROMPT_REF) for span in spans.get_finished_spans()]
    assert refs == [first.ref, None, None, second.ref]
    recorded = json.loads(attrs(spans.get_finished_spans()[-1])[sc.GEN_AI_INPUT_MESSAGES])
    assert recorded[0]["parts"][0]["content"] == "Answer with the number only."  # what the upstream saw


def server_gateway(server: BackgroundServer) -> Any:
    return server._server.config.app.state.gateway


def server_prompt(server: BackgroundServer) -> str:
    return str(server_gateway(server).prompt_sources[0].current.version.ref)


def test_gateway_spans_become_transitions_with_token_ids(
    gateway: BackgroundServer, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    import datetime as dt

    import polars as pl
    from support.spans_factory import SpansFactory

    from tracelearn.collector.span_rows import from_readable_span
    from tracelearn.pipelines.build import build_transitions
    from tracelearn.pipelines.config import parse_config

    client = client_of(gateway)
    first_prompts = []
    for rollout, question in enumerate(("What is 2 plus 2?", "What is 3 plus 5?"), start=1):
        # One trace per rollout: both calls of the agent carry its traceparent.
        headers = {"traceparent": f"00-{rollout:032x}-{rollout:016x}-01"}
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
        first_prompts.append(prompt_ids(messages))
        first = client.chat.completions.create(model="m", messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                               extra_headers=headers)
        call = (first.choices[0].message.tool_calls or [])[0]
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "4"}]
        client.chat.completions.create(model="m", messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                       extra_headers=headers)

    factory = SpansFactory(tmp_path / "data" / "spans")
    factory.records = [from_readable_span(span) for span in spans.get_finished_spans()]
    factory.write()
    config = parse_config({"reward": {"missing": "fill", "fill_value": 0.0}})
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    result = build_transitions(tmp_path / "data", tmp_path / "out", config, now=later)

    assert result.summary["rollouts"] == 2 and result.summary["without_token_ids"] == 0, result.summary
    transitions = pl.concat([pl.read_parquet(path) for path in result.transitions_files]).sort("rollout_id")
    assert transitions["token_ids_source"].to_list() == ["server"] * transitions.height
    assert sorted(transitions.group_by("rollout_id").agg(pl.col("prompt_token_ids").first())["prompt_token_ids"]
                  .to_list()) == sorted(first_prompts)


def test_cli_reports_bad_settings() -> None:
    runner = CliRunner()
    bad_url = runner.invoke(gateway_command, ["--upstream", "not a url"])
    assert bad_url.exit_code != 0 and "not an http(s) URL" in bad_url.output
    bad_rule = runner.invoke(gateway_command, ["--upstream", "http://127.0.0.1:1/v1", "--prompt-substitution", "m="])
    assert bad_rule.exit_code != 0 and "MODEL=REF" in bad_rule.output
    assert "--prompt-substitution" in runner.invoke(gateway_command, ["--help"]).output


def test_the_gateway_command_lands_spans_in_the_parquet_dataset(scripted: ScriptedLLMServer, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    command = [str(Path(sys.executable).parent / "tracelearn"), "gateway", "--upstream", scripted.base_url,
               "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "TRACELEARN_DATA": str(data)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="scripted-model", messages=HELLO)  # type: ignore[arg-type]
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert answer.choices[0].message.content == "You said: hello"

    spans = pl.read_parquet(data / "spans" / "**" / "*.parquet")
    llm = spans.filter(pl.col("span_type") == "llm")
    assert llm.height == 1, output
    assert llm["prompt_token_ids"].to_list()[0] == prompt_ids(HELLO)
