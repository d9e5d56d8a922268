"""Token-id capture, in process: the real SDK, Traceloop's real OpenAI (and LangChain) instrumentation
and the real ``openai`` client (sync, async, streaming, raw responses, LangChain) against the
scripted server."""

import asyncio
import gzip
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai._base_client import SyncAPIClient
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.instrumentors import traceloop_langchain, traceloop_openai
from support.scripted_llm_server import (
    Reply,
    ScriptedError,
    ScriptedLLMServer,
    default_script,
    logprob_of,
    prompt_ids,
    tokenize,
)

from tracelearn.instrumentation.token_id_responses import ResponseReader, TokenIdsCapture
from tracelearn.instrumentation.token_ids import TokenIdsInstrumentor, is_private_host, should_request_token_ids
from tracelearn.schemas import semconv as sc

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }
]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def traceloop(provider: TracerProvider) -> Iterator[None]:
    with traceloop_openai(provider):
        yield


@pytest.fixture
def token_ids(provider: TracerProvider) -> Iterator[Callable[..., None]]:
    """``token_ids(mode=...)`` instruments our hook; it is uninstrumented (and forgets servers) after."""

    def instrument(**kwargs: Any) -> None:
        TokenIdsInstrumentor().instrument(tracer_provider=provider, **kwargs)

    yield instrument
    if TokenIdsInstrumentor().is_instrumented_by_opentelemetry:
        TokenIdsInstrumentor().uninstrument()


@pytest.fixture
def server(scripted_llm_server: ScriptedLLMServer) -> ScriptedLLMServer:
    return scripted_llm_server


@pytest.fixture
def client(server: ScriptedLLMServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)


@pytest.fixture
def async_client(server: ScriptedLLMServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def only_llm_span(exporter: InMemorySpanExporter) -> dict[str, Any]:
    (span,) = spans_named(exporter, "openai.chat")
    return dict(span.attributes or {})


def assert_server_ids(attributes: dict[str, Any], messages: list[dict[str, Any]], text: str) -> None:
    assert attributes[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_FROM_SERVER
    assert list(attributes[sc.PROMPT_TOKEN_IDS]) == prompt_ids(messages)
    assert list(attributes[sc.RESPONSE_TOKEN_IDS]) == tokenize(text)
    assert list(attributes[sc.RESPONSE_LOGPROBS]) == [logprob_of(i) for i in tokenize(text)]


# --- Where the ids land -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["traceloop_first", "token_ids_first"])
def test_sync_call_records_the_servers_ids_on_the_traceloop_span(
    order: str,
    provider: TracerProvider,
    token_ids: Callable[..., None],
    exporter: InMemorySpanExporter,
    server: ScriptedLLMServer,
    client: openai.OpenAI,
) -> None:
    if order == "token_ids_first":
        token_ids()
    with traceloop_openai(provider):
        if order == "traceloop_first":
            token_ids()
        response = client.chat.completions.create(model="m", messages=HELLO)

    (sent,) = server.chat_requests()
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    attributes = only_llm_span(exporter)
    assert_server_ids(attributes, HELLO, "You said: hello")
    assert attributes[sc.GEN_AI_RESPONSE_ID] == response.id
    assert not spans_named(exporter, sc.SPAN_TOKEN_IDS)
    # The agent sees the server's answer untouched.
    assert response.choices[0].message.content == "You said: hello"


@pytest.mark.usefixtures("traceloop")
def test_async_call(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, async_client: openai.AsyncOpenAI
) -> None:
    token_ids()
    response = asyncio.run(async_client.chat.completions.create(model="m", messages=HELLO))
    attributes = only_llm_span(exporter)
    assert_server_ids(attributes, HELLO, "You said: hello")
    assert attributes[sc.GEN_AI_RESPONSE_ID] == response.id


@pytest.mark.usefixtures("traceloop")
def test_sync_stream_accumulates_chunk_ids_before_the_llm_span_ends(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, client: openai.OpenAI
) -> None:
    token_ids()
    stream = client.chat.completions.create(
        model="m", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "You said: hello"
    # Attributes set after the span ended would have been dropped: their presence proves the order.
    attributes = only_llm_span(exporter)
    assert_server_ids(attributes, HELLO, text)
    assert attributes[sc.GEN_AI_RESPONSE_ID] == "chatcmpl-scripted-1"


@pytest.mark.usefixtures("traceloop")
def test_async_stream(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, async_client: openai.AsyncOpenAI
) -> None:
    token_ids()

    async def run() -> str:
        stream = await async_client.chat.completions.create(model="m", messages=HELLO, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    text = asyncio.run(run())
    assert_server_ids(only_llm_span(exporter), HELLO, text)


@pytest.mark.usefixtures("traceloop")
@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_then_answer_each_turn_gets_its_own_ids(
    stream: bool, token_ids: Callable[..., None], exporter: InMemorySpanExporter, client: openai.OpenAI
) -> None:
    token_ids()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is 12 plus 30?"}]
    first_prompt = list(messages)
    first = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=stream)
    if stream:
        calls = [c for chunk in first for c in chunk.choices[0].delta.tool_calls or ()]
    else:
        calls = list(first.choices[0].message.tool_calls or ())
    (call,) = calls
    assert json.loads(call.function.arguments) == {"expression": "12 + 30"}
    tool_call = {
        "id": call.id,
        "type": "function",
        "function": {"name": "calculator", "arguments": call.function.arguments},
    }
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    second = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=stream)
    if stream:
        assert "".join(chunk.choices[0].delta.content or "" for chunk in second) == "42"

    turn_one, turn_two = (dict(s.attributes or {}) for s in spans_named(exporter, "openai.chat"))
    calls_text = default_script({"messages": first_prompt, "tools": TOOLS}).completion_text()
    assert_server_ids(turn_one, first_prompt, calls_text)
    assert_server_ids(turn_two, messages, "42")


@pytest.mark.usefixtures("traceloop")
def test_raw_response_as_langchain_uses_it(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, client: openai.OpenAI
) -> None:
    token_ids()
    raw = client.chat.completions.with_raw_response.create(model="m", messages=HELLO)
    assert raw.parse().choices[0].message.content == "You said: hello"
    assert_server_ids(only_llm_span(exporter), HELLO, "You said: hello")


@pytest.mark.usefixtures("traceloop")
def test_langchain_chat_openai(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer
) -> None:
    from langchain_openai import ChatOpenAI

    token_ids()
    model = ChatOpenAI(model="m", base_url=server.base_url, api_key="test", max_retries=0)
    assert model.invoke("hello").content == "You said: hello"
    assert_server_ids(only_llm_span(exporter), HELLO, "You said: hello")


def test_langchain_instrumentation_suppresses_the_openai_span_so_ours_joins_by_response_id(
    provider: TracerProvider, token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer
) -> None:
    """Traceloop's LangChain handler owns the LLM span, suppresses ``openai.chat`` and does not keep its
    span current during the request: the ids go on our own span, which shares the response id."""
    from langchain_openai import ChatOpenAI

    token_ids()
    with traceloop_openai(provider), traceloop_langchain(provider):
        model = ChatOpenAI(model="m", base_url=server.base_url, api_key="test", max_retries=0)
        model.invoke("hello")

    assert not spans_named(exporter, "openai.chat")
    (langchain_span,) = spans_named(exporter, "ChatOpenAI.chat")
    (own,) = spans_named(exporter, sc.SPAN_TOKEN_IDS)
    attributes = dict(own.attributes or {})
    assert attributes[sc.GEN_AI_RESPONSE_ID] == (langchain_span.attributes or {})[sc.GEN_AI_RESPONSE_ID]
    assert_server_ids(attributes, HELLO, "You said: hello")


@pytest.mark.usefixtures("traceloop")
def test_several_choices_record_choice_zero_and_say_so(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, client: openai.OpenAI
) -> None:
    token_ids()
    client.chat.completions.create(model="m", messages=HELLO, n=3)
    attributes = only_llm_span(exporter)
    assert_server_ids(attributes, HELLO, "You said: hello")
    assert attributes[sc.RESPONSE_CHOICE_COUNT] == 3


@pytest.mark.usefixtures("traceloop")
def test_a_callers_own_logprobs_setting_wins(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    token_ids()
    client.chat.completions.create(model="m", messages=HELLO, logprobs=False)
    (sent,) = server.chat_requests()
    assert sent["logprobs"] is False and sent["return_token_ids"] is True
    attributes = only_llm_span(exporter)
    assert attributes[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_FROM_SERVER
    assert sc.RESPONSE_LOGPROBS not in attributes


@pytest.mark.usefixtures("traceloop")
def test_a_server_that_ignores_the_parameter_is_counted_missing(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    server.token_ids = False
    token_ids()
    client.chat.completions.create(model="m", messages=HELLO)
    attributes = only_llm_span(exporter)
    assert attributes[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_MISSING
    assert sc.PROMPT_TOKEN_IDS not in attributes and sc.RESPONSE_TOKEN_IDS not in attributes


# --- Whom to ask ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "private"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("10.1.2.3", True),
        ("192.168.0.7", True),
        ("172.16.5.4", True),
        ("fd00::1", True),
        ("vllm", True),
        ("vllm.default.svc.cluster.local", True),
        ("host.docker.internal", True),
        ("api.openai.com", False),
        ("8.8.8.8", False),
        ("my-vllm.example.com", False),
        ("", False),
    ],
)
def test_private_hosts_are_recognized_without_dns(host: str, private: bool) -> None:
    assert is_private_host(host) is private


def test_modes() -> None:
    assert should_request_token_ids("http://127.0.0.1:8000/v1", "auto")
    assert not should_request_token_ids("https://api.openai.com/v1", "auto")
    assert should_request_token_ids("https://api.openai.com/v1", "on")
    assert not should_request_token_ids("http://127.0.0.1:8000/v1", "off")


class LoopbackTransport(httpx2.HTTPTransport):
    """Sends every request to the scripted server, whatever host the client thinks it talks to."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        return super().handle_request(request)


@pytest.mark.usefixtures("traceloop")
def test_auto_never_asks_a_hosted_api(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer
) -> None:
    token_ids(mode="auto")
    hosted = openai.OpenAI(
        base_url="https://api.example.com/v1",
        api_key="test",
        max_retries=0,
        http_client=httpx2.Client(transport=LoopbackTransport(server.port)),
    )
    hosted.chat.completions.create(model="m", messages=HELLO)
    (sent,) = server.chat_requests()
    assert "return_token_ids" not in sent and "logprobs" not in sent
    attributes = only_llm_span(exporter)
    assert attributes[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_NOT_REQUESTED
    assert sc.RESPONSE_TOKEN_IDS not in attributes


@pytest.mark.usefixtures("traceloop")
def test_off_sends_nothing(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    token_ids(mode="off")
    client.chat.completions.create(model="m", messages=HELLO)
    (sent,) = server.chat_requests()
    assert "return_token_ids" not in sent and "logprobs" not in sent
    assert only_llm_span(exporter)[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_NOT_REQUESTED


@pytest.mark.usefixtures("traceloop")
def test_off_still_reads_what_the_caller_asked_for_itself(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    token_ids(mode="off")
    client.chat.completions.create(model="m", messages=HELLO, extra_body={"return_token_ids": True})
    (sent,) = server.chat_requests()
    assert sent["return_token_ids"] is True and "logprobs" not in sent
    attributes = only_llm_span(exporter)
    assert attributes[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_FROM_SERVER
    assert list(attributes[sc.RESPONSE_TOKEN_IDS]) == tokenize("You said: hello")


def test_suppressed_instrumentation_leaves_the_request_alone(
    token_ids: Callable[..., None], server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    token_ids(mode="on")
    with suppress_instrumentation():
        client.chat.completions.create(model="m", messages=HELLO)
    assert "return_token_ids" not in server.chat_requests()[0]


def test_mode_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    token_ids: Callable[..., None],
    server: ScriptedLLMServer,
    client: openai.OpenAI,
) -> None:
    monkeypatch.setenv("TRACELEARN_TOKEN_IDS", "off")
    token_ids()
    client.chat.completions.create(model="m", messages=HELLO)
    assert "return_token_ids" not in server.chat_requests()[0]


@pytest.mark.usefixtures("traceloop")
@pytest.mark.parametrize("stream", [False, True])
def test_a_rejecting_server_is_retried_without_the_fields_and_not_asked_again(
    stream: bool,
    token_ids: Callable[..., None],
    exporter: InMemorySpanExporter,
    server: ScriptedLLMServer,
    client: openai.OpenAI,
) -> None:
    server.reject_token_ids = True
    token_ids()
    for _ in range(2):
        response = client.chat.completions.create(model="m", messages=HELLO, stream=stream)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in response) == "You said: hello"
        else:
            assert response.choices[0].message.content == "You said: hello"

    rejected, retried, second = server.chat_requests()
    assert rejected["return_token_ids"] is True
    assert "return_token_ids" not in retried and "logprobs" not in retried
    assert "return_token_ids" not in second
    for span in spans_named(exporter, "openai.chat"):
        assert (span.attributes or {})[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_REJECTED


@pytest.mark.usefixtures("traceloop")
def test_an_unrelated_error_from_a_server_that_accepted_the_fields_reaches_the_agent(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    def script(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["content"] == "too long":
            raise ScriptedError(400, "This model's maximum context length is 8 tokens")
        return default_script(body)

    server.script = script
    token_ids()
    client.chat.completions.create(model="m", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "too long"}])
    client.chat.completions.create(model="m", messages=HELLO)

    # No retry for the error, and the server is still asked afterwards.
    assert [body.get("return_token_ids") for body in server.chat_requests()] == [True, True, True]
    statuses = [(s.attributes or {}).get(sc.TOKEN_IDS_STATUS) for s in spans_named(exporter, "openai.chat")]
    assert statuses == [sc.TOKEN_IDS_FROM_SERVER, None, sc.TOKEN_IDS_FROM_SERVER]


# --- Without an LLM span ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_without_llm_instrumentation_our_own_span_carries_the_ids(
    stream: bool,
    provider: TracerProvider,
    token_ids: Callable[..., None],
    exporter: InMemorySpanExporter,
    client: openai.OpenAI,
) -> None:
    token_ids()
    with provider.get_tracer("agent").start_as_current_span("agent.step") as step:
        response = client.chat.completions.create(model="m", messages=HELLO, stream=stream)
        # All chunks carry the response id; the stream must be read to its end for the ids to be recorded.
        response_id = {chunk.id for chunk in response}.pop() if stream else response.id

    (own,) = spans_named(exporter, sc.SPAN_TOKEN_IDS)
    attributes = dict(own.attributes or {})
    assert attributes[sc.SPAN_TYPE] == sc.TYPE_TOKEN_IDS
    assert attributes[sc.GEN_AI_RESPONSE_ID] == response_id
    assert_server_ids(attributes, HELLO, "You said: hello")
    assert own.parent is not None and own.parent.span_id == step.get_span_context().span_id
    (user_span,) = spans_named(exporter, "agent.step")
    assert sc.TOKEN_IDS_STATUS not in (user_span.attributes or {})


def test_uninstrument_removes_the_hook(
    token_ids: Callable[..., None], server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    token_ids()
    TokenIdsInstrumentor().uninstrument()
    client.chat.completions.create(model="m", messages=HELLO)
    assert "return_token_ids" not in server.chat_requests()[0]


# --- Below every other wrapper: the hook sits on the HTTP client's send -----------------------------


# Bound when the class is defined, before any instrumentor runs, as OpenInference binds the SDK's
# ``request`` under its wrapper of ``OpenAI.request`` (tests/integration/test_token_ids_wrappers.py runs
# OpenInference itself, in its own environment: it cannot share the dev one with Traceloop's).
_SDK_REQUEST = SyncAPIClient.request


class AuditedOpenAI(openai.OpenAI):
    """A user's own client: it overrides ``request`` to count calls, then runs the SDK's."""

    requests_seen = 0

    def request(self, *args: Any, **kwargs: Any) -> Any:
        AuditedOpenAI.requests_seen += 1
        return _SDK_REQUEST(self, *args, **kwargs)


@pytest.mark.usefixtures("traceloop")
def test_a_users_subclass_overriding_request_still_gets_ids(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer
) -> None:
    token_ids()
    client = AuditedOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    client.chat.completions.create(model="m", messages=HELLO)
    assert AuditedOpenAI.requests_seen >= 1
    assert_server_ids(only_llm_span(exporter), HELLO, "You said: hello")


@pytest.mark.usefixtures("traceloop")
@pytest.mark.parametrize("stream", [False, True])
def test_an_sdk_client_on_a_legacy_httpx_client(
    stream: bool, token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer
) -> None:
    import httpx

    token_ids()
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, http_client=httpx.Client())
    response = client.chat.completions.create(model="m", messages=HELLO, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in response) if stream else "You said: hello"
    assert_server_ids(only_llm_span(exporter), HELLO, text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_is_not_the_openai_sdk_posting_over_httpx(
    stream: bool,
    provider: TracerProvider,
    token_ids: Callable[..., None],
    exporter: InMemorySpanExporter,
    server: ScriptedLLMServer,
) -> None:
    """As LiteLLM's own OpenAI-compatible handler does: a JSON POST, an LLM span of its own around it."""
    token_ids()
    body = {"model": "m", "messages": HELLO, "stream": stream}
    llm_attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}
    with provider.get_tracer("litellm-like").start_as_current_span("litellm_request", attributes=llm_attributes):
        with httpx2.Client() as http:
            with http.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
                raw = b"".join(response.iter_bytes())
    assert (b"data: [DONE]" in raw) is stream
    (span,) = spans_named(exporter, "litellm_request")
    assert_server_ids(dict(span.attributes or {}), HELLO, "You said: hello")


@pytest.mark.usefixtures("traceloop")
def test_a_streaming_response_of_a_whole_body_is_read_when_the_caller_reads_it(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, client: openai.OpenAI
) -> None:
    token_ids()
    with client.chat.completions.with_streaming_response.create(model="m", messages=HELLO) as response:
        assert response.parse().choices[0].message.content == "You said: hello"
    assert_server_ids(only_llm_span(exporter), HELLO, "You said: hello")


@pytest.mark.usefixtures("traceloop")
def test_a_message_that_mentions_the_field_names_is_not_mistaken_for_the_callers_setting(
    token_ids: Callable[..., None], exporter: InMemorySpanExporter, server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    messages = [{"role": "user", "content": 'Explain "return_token_ids" and "logprobs" in vLLM.'}]
    token_ids()
    client.chat.completions.create(model="m", messages=messages)
    (sent,) = server.chat_requests()
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    assert sent["messages"] == messages
    assert only_llm_span(exporter)[sc.TOKEN_IDS_STATUS] == sc.TOKEN_IDS_FROM_SERVER


def test_other_requests_pass_through_untouched(
    token_ids: Callable[..., None], server: ScriptedLLMServer, client: openai.OpenAI
) -> None:
    token_ids(mode="on")
    assert [model.id for model in client.models.list()] == ["scripted-model"]
    sent: list[httpx2.Request] = []  # request hooks see each request as it goes on the wire
    with httpx2.Client(event_hooks={"request": [sent.append]}) as http:
        http.post(f"{server.base_url}/embeddings", json={"input": "x"})
        http.post(f"{server.base_url}/chat/completions", content=b"not json")
        http.post(f"{server.base_url}/chat/completions", json=[HELLO])
        http.post(f"{server.base_url}/chat/completions", json={})
    assert [json.loads(r.content) if r.content != b"not json" else r.content for r in sent] == [
        {"input": "x"},
        b"not json",
        [HELLO],
        {},
    ]
    assert server.chat_requests() == [{}]


def test_without_an_llm_span_one_warning_says_what_to_install(
    token_ids: Callable[..., None], client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    token_ids()
    for _ in range(3):
        client.chat.completions.create(model="m", messages=HELLO)
    (warning,) = [r.getMessage() for r in caplog.records if "no LLM instrumentation" in r.getMessage()]
    assert "opentelemetry-instrumentation-openai" in warning
    assert client.base_url.host in warning


def test_without_an_llm_span_a_framework_on_the_call_stack_is_named(
    token_ids: Callable[..., None], server: ScriptedLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    from langchain_openai import ChatOpenAI

    token_ids()
    ChatOpenAI(model="m", base_url=server.base_url, api_key="test", max_retries=0).invoke("hello")
    (warning,) = [r.getMessage() for r in caplog.records if "no LLM instrumentation" in r.getMessage()]
    assert "it came from LangChain, whose instrumentation is opentelemetry-instrumentation-langchain" in warning
    assert "opentelemetry-instrumentation-openai" in warning  # ChatOpenAI sends through the openai SDK


@pytest.mark.usefixtures("traceloop")
def test_with_an_llm_span_nothing_is_said(
    token_ids: Callable[..., None], client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    token_ids()
    client.chat.completions.create(model="m", messages=HELLO)
    assert not [r for r in caplog.records if "no LLM instrumentation" in r.getMessage()]


# --- Reading a stream as it passes ------------------------------------------------------------------


def sse_body(server: ScriptedLLMServer, body: dict[str, Any], end: str = "\r\n") -> bytes:
    """The server's chunks as SSE, with what else a stream may hold: a comment, an event name, a
    multi-line data field."""
    events = [f"data: {json.dumps(chunk)}{end}{end}" for chunk in server.chunks(body, 1)]
    events[1] = f": keep-alive{end}{end}event: chunk{end}" + events[1]
    first, rest = events[2].split(", ", 1)
    events[2] = f"{first},{end}data: {rest}"
    return "".join(events).encode() + f"data: [DONE]{end}{end}".encode()


@pytest.mark.parametrize("piece_size", [1, 7, 4096])
@pytest.mark.parametrize("encoding", ["", "gzip"])
@pytest.mark.parametrize("end", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_a_stream_is_read_whatever_its_pieces_line_ends_and_encoding(
    piece_size: int, encoding: str, end: str, server: ScriptedLLMServer
) -> None:
    body = {"messages": HELLO, "stream": True, "return_token_ids": True, "logprobs": True}
    raw = sse_body(server, body, end)
    sent = gzip.compress(raw) if encoding else raw
    recorded: list[TokenIdsCapture] = []
    reader = ResponseReader(recorded.append, "text/event-stream; charset=utf-8")
    reader.expect_encoding(encoding)
    for start in range(0, len(sent), piece_size):
        reader.feed(sent[start : start + piece_size])
    (capture,) = recorded  # recorded at [DONE], before the stream's end
    reader.finish()
    assert len(recorded) == 1
    assert_server_ids(capture.attributes(), HELLO, "You said: hello")


def test_an_unreadable_event_drops_the_ids_rather_than_keeping_part_of_them(server: ScriptedLLMServer) -> None:
    raw = sse_body(server, {"messages": HELLO, "stream": True, "return_token_ids": True})
    recorded: list[TokenIdsCapture] = []
    reader = ResponseReader(recorded.append, "text/event-stream")
    first_event, rest = raw.split(b"\r\n\r\n", 1)
    reader.feed(first_event + b"\r\n\r\ndata: {not json\r\n\r\n" + rest)
    reader.finish()
    (capture,) = recorded
    assert capture.status() == sc.TOKEN_IDS_MISSING
    assert capture.response_token_ids is None and capture.response_id == "chatcmpl-scripted-1"
