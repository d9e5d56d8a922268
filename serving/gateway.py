"""The LLM gateway: an OpenAI-compatible proxy that records every chat completion as an LLM span.

An unmodified agent points its ``base_url`` at the gateway; the gateway forwards to one upstream
(vLLM, ``tracelearn serve``, a hosted API) and owns four things:

* **Faithful proxying.** ``/v1/chat/completions`` (streamed server-sent events are passed on event by
  event), ``/v1/models`` and every other ``/v1/*`` path keep the upstream's status codes, error
  bodies and headers (``retry-after`` included). An upstream that cannot be reached is a 502 (a
  timeout a 504) with an OpenAI error body naming the upstream.
* **Token ids.** Chat requests get ``"return_token_ids": true`` and ``"logprobs": true`` (vLLM's
  extension; the embedded server has it too) unless the client asked for them itself, and what the
  client did not ask for is stripped from the response, so the agent sees exactly the semantics it
  requested. Whom to ask (``token_ids``): ``on`` every upstream, ``off`` none, ``auto`` (default)
  upstreams on loopback, private addresses and local names, the rule of
  ``tracelearn.instrumentation.token_ids`` (a hosted API never receives the fields). An upstream that
  answers 400/422 with an error naming one of the added fields is remembered as not supporting it
  and the request is sent again without it, so a mis-guessed upstream costs one extra request, once.
* **One LLM span per call**, through the global tracer provider (or the one given), named
  ``chat {model}`` with the attributes the in-process instrumentation writes and the pipeline reads:
  ``gen_ai.operation.name``, request/response model, response id, finish reasons, usage, messages as
  ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (GenAI parts JSON), token ids, logprobs and
  ``tracelearn.llm.token_ids_status``, and ``tracelearn.model.version``. A W3C ``traceparent`` (and
  ``baggage``: rollout identity) on the request continues the caller's trace; otherwise each call is
  a trace of its own. The span's context is sent upstream as ``traceparent``.
* **Prompt substitution** (optional, ``PromptRule``): the system message of a chat request is
  replaced by a registry prompt, re-read when its alias moves. The rule: a request is substituted
  when it has a system (or developer) message as its first message and its ``model`` matches the
  rule's model (a rule without a model matches every request); requests without a system message are
  never given one. The first matching rule wins. The span records the messages the upstream saw and
  ``tracelearn.prompt.ref`` (``name@version``).

The model version is read from the upstream: the ``x-tracelearn-model-version`` header of
``tracelearn serve``, else ``system_fingerprint``, else the response's (or request's) model name. It is
recorded on the span and returned in the ``x-tracelearn-model-version`` response header (for a stream,
from the first event, which the gateway reads before answering).

Use both this gateway and an in-process LLM instrumentation on the same calls only with trace
propagation: the gateway's span is then nested under the agent's and the pipeline counts the call once.

This module is the proxy (``Gateway``) and its app; the rest lives beside it, one concern each:
``gateway_upstream`` (the upstream's URL, headers both ways, its failures), ``gateway_prompts``
(prompt substitution), ``gateway_spans`` (what a call's span records) and ``gateway_responses``
(stripping what the client did not ask for, server-sent events).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, Status, StatusCode

from tracelearn.instrumentation.token_ids import (
    LOGPROBS,
    RETURN_TOKEN_IDS,
    should_request_token_ids,
    token_ids_mode,
)
from tracelearn.schemas import semconv as sc
from tracelearn.serving.gateway_prompts import GatewayConfigError, PromptRule, PromptSource, substitute_system_prompt
from tracelearn.serving.gateway_responses import ClientAsked, sse_events
from tracelearn.serving.gateway_spans import (
    HTTP_STATUS,
    ResponseRecord,
    end_failed,
    end_with_error,
    end_with_upstream_error,
    input_messages_json,
)
from tracelearn.serving.gateway_upstream import (
    REJECTION_STATUSES,
    UpstreamError,
    error_body,
    forwarded_headers,
    normalize_upstream,
    rejected_fields,
    response_headers,
)
from tracelearn.serving.protocol import MODEL_VERSION_HEADER

if TYPE_CHECKING:
    from tracelearn.registry import Registry

PROMPT_VERSION_HEADER: Final = "x-tracelearn-prompt-version"

TOKEN_ID_FIELDS: Final = (RETURN_TOKEN_IDS, LOGPROBS)

_log = logging.getLogger(__name__)


class Gateway:
    """The proxy's state: the upstream client, what it learned about the upstream, the prompt sources."""

    def __init__(
        self,
        upstream: str,
        *,
        token_ids: str = "auto",
        prompt_sources: Sequence[PromptSource] = (),
        tracer_provider: trace.TracerProvider | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.upstream = normalize_upstream(upstream)
        self.mode = token_ids_mode(token_ids)
        self.prompt_sources = list(prompt_sources)
        self.tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self.rejected_fields: set[str] = set()  # learned: the upstream refuses these fields
        # Chat completion requests, and those whose system message became a registry prompt (``/health``).
        self.chat_calls = 0
        self.substituted = 0
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._client: httpx.AsyncClient | None = None
        parts = urlsplit(self.upstream)
        self._server_attributes: dict[str, Any] = {
            "server.address": parts.hostname or "",
            sc.GATEWAY_UPSTREAM: self.upstream,
        }
        if parts.port is not None:
            self._server_attributes["server.port"] = parts.port

    @property
    def client(self) -> httpx.AsyncClient:
        # Created on first use, inside the serving event loop.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close(self) -> None:
        """Stop polling the registry (the HTTP client closes with the event loop)."""
        for source in self.prompt_sources:
            source.stop()

    def url(self, path: str, query: str) -> str:
        return f"{self.upstream}/{path.lstrip('/')}" + (f"?{query}" if query else "")

    def unreachable(self, error: httpx.TransportError) -> UpstreamError:
        if isinstance(error, httpx.TimeoutException):
            return UpstreamError(504, f"the upstream model server {self.upstream} did not answer in time "
                                      f"({type(error).__name__}); raise --timeout or check its load",
                                 "upstream_timeout")
        return UpstreamError(502, f"the upstream model server {self.upstream} could not be reached "
                                  f"({type(error).__name__}: {error}); check that it is running and that --upstream "
                                  "names it", "upstream_unreachable")

    def fields_to_add(self, body: Mapping[str, Any]) -> list[str]:
        if not should_request_token_ids(self.upstream, self.mode):
            return []
        return [name for name in TOKEN_ID_FIELDS if not body.get(name) and name not in self.rejected_fields]

    def prompt_for(self, model: Any) -> PromptSource | None:
        return next((source for source in self.prompt_sources if source.rule.matches(model)), None)

    # -- generic /v1/* ---------------------------------------------------------------------------------

    async def forward(self, request: Request, path: str) -> Response:
        """Any other ``/v1/*`` request, passed through unchanged (bytes streamed both ways)."""
        upstream_request = self.client.build_request(
            request.method, self.url(path, request.url.query), headers=forwarded_headers(request.headers.items()),
            content=await request.body(),
        )
        try:
            response = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as error:
            return self.unreachable(error).response()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for piece in response.aiter_raw():
                    yield piece
            finally:
                await response.aclose()

        return StreamingResponse(body(), status_code=response.status_code,
                                 headers=response_headers(response.headers, decoded=False))

    # -- chat completions ------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        self.chat_calls += 1
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await self.forward_body(request, raw)  # the upstream answers a malformed body its own way
        parent = propagate.extract(dict(request.headers))
        model = body.get("model")
        span = self.tracer.start_span(f"chat {model}", context=parent, kind=SpanKind.CLIENT,
                                      attributes=self._request_attributes(body, parent))
        try:
            substituted = self._substitute(body, span)
            asked = ClientAsked.of(body)
            headers = forwarded_headers(request.headers.items())
            headers.pop("traceparent", None)
            headers.pop("tracestate", None)
            headers["accept-encoding"] = "identity"
            propagate.inject(headers, context=trace.set_span_in_context(span, parent))
            span.set_attribute(sc.GEN_AI_INPUT_MESSAGES, input_messages_json(body.get("messages")))
            extra_headers = {PROMPT_VERSION_HEADER: substituted} if substituted else {}
            if body.get("stream"):
                return await self._stream(body, headers, asked, span, extra_headers)
            return await self._complete(body, headers, asked, span, extra_headers)
        except BaseException as error:
            end_with_error(span, error)
            raise

    async def forward_body(self, request: Request, raw: bytes) -> Response:
        try:
            response = await self.client.request(request.method, self.url("chat/completions", request.url.query),
                                                 headers=forwarded_headers(request.headers.items()), content=raw)
        except httpx.TransportError as error:
            return self.unreachable(error).response()
        return Response(response.content, status_code=response.status_code,
                        headers=response_headers(response.headers, decoded=True))

    def _request_attributes(self, body: Mapping[str, Any], parent: otel_context.Context) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_PROVIDER_NAME: "openai",
            **self._server_attributes,
        }
        if isinstance(body.get("model"), str):
            attributes[sc.GEN_AI_REQUEST_MODEL] = body["model"]
        for key in ("temperature", "top_p", "max_tokens", "seed"):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[f"gen_ai.request.{key}"] = value
        # Rollout identity travels in W3C baggage; the gateway process has no rollout of its own.
        for key, value in baggage.get_all(parent).items():
            if key in sc.BAGGAGE_KEYS and isinstance(value, str):
                attributes[key] = value
        return attributes

    def _substitute(self, body: dict[str, Any], span: trace.Span) -> str | None:
        source = self.prompt_for(body.get("model"))
        if source is None:
            return None
        prompt = source.current
        if not substitute_system_prompt(body, prompt.text):
            return None
        span.set_attributes({sc.PROMPT_REF: prompt.version.ref, sc.PROMPT_REQUESTED: source.rule.reference})
        self.substituted += 1
        return prompt.version.ref

    async def _send_chat(
        self, body: dict[str, Any], headers: dict[str, str], stream: bool
    ) -> tuple[httpx.Response, bool]:
        """POST the chat request with the token-id fields the upstream takes; returns (response, asked ids).

        A 400/422 naming a field we added teaches the gateway that the upstream refuses it; the
        request is then sent again without it (at most once per added field).
        """
        added = self.fields_to_add(body)
        while True:
            sent = {**body, **dict.fromkeys(added, True)}
            request = self.client.build_request("POST", self.url("chat/completions", ""), headers=headers, json=sent)
            try:
                # The gateway asks for and records token ids itself: the in-process token-id hook stays out.
                with suppress_instrumentation():
                    response = await self.client.send(request, stream=stream)
            except httpx.TransportError as error:
                raise self.unreachable(error) from error
            if not added or response.status_code not in REJECTION_STATUSES:
                return response, bool(sent.get(RETURN_TOKEN_IDS))
            text = (await response.aread()).decode("utf-8", errors="replace")
            refused = rejected_fields(response.status_code, text, added)
            if not refused:
                return response, bool(sent.get(RETURN_TOKEN_IDS))
            await response.aclose()
            self.rejected_fields.update(refused)
            _log.info("gateway: %s rejected %s (HTTP %s); retrying without and not sending them again",
                      self.upstream, ", ".join(refused), response.status_code)
            added = [name for name in added if name not in refused]

    def _status_when_not_asked(self) -> str:
        rejected = RETURN_TOKEN_IDS in self.rejected_fields
        return sc.TOKEN_IDS_REJECTED if rejected else sc.TOKEN_IDS_NOT_REQUESTED

    async def _complete(
        self, body: dict[str, Any], headers: dict[str, str], asked: ClientAsked, span: trace.Span,
        extra_headers: dict[str, str],
    ) -> Response:
        try:
            response, asked_ids = await self._send_chat(body, headers, stream=False)
        except UpstreamError as error:
            end_with_upstream_error(span, error)
            return error.response()
        content = response.content
        span.set_attribute(HTTP_STATUS, response.status_code)
        out_headers = response_headers(response.headers, decoded=True)
        try:
            payload = json.loads(content)
        except ValueError:
            payload = None
        if response.status_code >= 400 or not isinstance(payload, dict):
            end_failed(span, response.status_code, content)
            return Response(content, status_code=response.status_code, headers=out_headers)
        record = ResponseRecord(asked_token_ids=asked_ids)
        record.add_response(payload)
        version = record.model_version(response.headers.get(MODEL_VERSION_HEADER), body.get("model"))
        span.set_attributes(record.attributes(self._status_when_not_asked()))
        span.set_attribute(sc.MODEL_VERSION, version)
        span.end()
        asked.strip(payload, streamed=False)
        out_headers.update({MODEL_VERSION_HEADER: version, **extra_headers})
        out_headers.pop("content-type", None)
        return JSONResponse(payload, status_code=response.status_code, headers=out_headers)

    async def _stream(
        self, body: dict[str, Any], headers: dict[str, str], asked: ClientAsked, span: trace.Span,
        extra_headers: dict[str, str],
    ) -> Response:
        try:
            response, asked_ids = await self._send_chat(body, headers, stream=True)
        except UpstreamError as error:
            end_with_upstream_error(span, error)
            return error.response()
        span.set_attribute(HTTP_STATUS, response.status_code)
        out_headers = response_headers(response.headers, decoded=True)
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            end_failed(span, response.status_code, content)
            return Response(content, status_code=response.status_code, headers=out_headers)
        record = ResponseRecord(asked_token_ids=asked_ids)
        events = sse_events(response)
        # The first event is read before answering so the model version header can come from it.
        try:
            first = await anext(events, None)
        except httpx.TransportError as error:
            await response.aclose()
            upstream_error = self.unreachable(error)
            end_with_upstream_error(span, upstream_error)
            return upstream_error.response()
        if first is not None and first.payload is not None:
            record.add_chunk(first.payload)
        version = record.model_version(response.headers.get(MODEL_VERSION_HEADER), body.get("model"))
        out_headers.update({MODEL_VERSION_HEADER: version, **extra_headers})
        status_when_not_asked = self._status_when_not_asked()

        async def relay() -> AsyncIterator[bytes]:
            completed = False
            try:
                event = first
                while event is not None:
                    if event.payload is not None and event is not first:
                        record.add_chunk(event.payload)
                    text = event.render(asked)
                    if text is not None:
                        yield text.encode()
                    event = await anext(events, None)
                completed = True
            except httpx.TransportError as error:
                record.error = f"the upstream stream broke: {type(error).__name__}: {error}"
                message = error_body(f"{record.error}; the response is incomplete", "upstream_error",
                                      "upstream_broken")
                yield f"data: {json.dumps(message)}\n\n".encode()
            finally:
                await response.aclose()
                span.set_attributes(record.attributes(status_when_not_asked))
                span.set_attribute(sc.MODEL_VERSION, record.model_version(
                    response.headers.get(MODEL_VERSION_HEADER), body.get("model")))
                if record.error is not None:
                    span.set_status(Status(StatusCode.ERROR, record.error))
                elif not completed:
                    span.set_status(Status(StatusCode.ERROR, "the client went away before the stream ended"))
                span.end()

        out_headers.pop("content-type", None)
        return StreamingResponse(relay(), status_code=response.status_code, media_type="text/event-stream",
                                 headers=out_headers)


# --- The app ----------------------------------------------------------------------------------------


def create_gateway_app(
    upstream: str,
    *,
    token_ids: str = "auto",
    prompt_rules: Sequence[PromptRule] = (),
    registry: Registry | None = None,
    prompt_poll_seconds: float = 5.0,
    tracer_provider: trace.TracerProvider | None = None,
    timeout_s: float = 600.0,
) -> FastAPI:
    """The gateway app in front of ``upstream`` (an OpenAI base URL; ``/v1`` is added when it has no path).

    ``prompt_rules`` need a ``registry`` (default: ``tracelearn.registry.open_registry()``); each
    prompt is read now (an unknown reference fails here) and then polled every
    ``prompt_poll_seconds``. ``app.state.gateway`` is the ``Gateway``; call its ``close()`` when done.
    """
    sources: list[PromptSource] = []
    if prompt_rules:
        if registry is None:
            from tracelearn.registry import open_registry

            registry = open_registry()
        for rule in prompt_rules:
            try:
                sources.append(PromptSource(registry, rule, prompt_poll_seconds).start())
            except Exception as error:
                for started in sources:
                    started.stop()
                raise GatewayConfigError(f"prompt substitution {rule.reference!r}: {error}") from error
    gateway = Gateway(upstream, token_ids=token_ids, prompt_sources=sources, tracer_provider=tracer_provider,
                      timeout_s=timeout_s)
    app = FastAPI(title="tracelearn gateway")
    app.state.gateway = gateway

    @app.get("/health")
    async def health() -> dict[str, Any]:
        prompts = {s.rule.reference: s.current.version.ref for s in gateway.prompt_sources}
        return {"status": "ok", "upstream": gateway.upstream, "prompts": prompts, "chat_calls": gateway.chat_calls,
                "substituted": gateway.substituted}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await gateway.chat_completions(request)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], response_model=None)
    async def other(request: Request, path: str) -> Response:
        return await gateway.forward(request, path)

    return app
