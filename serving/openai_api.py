"""The HTTP face of the engine: an OpenAI-compatible FastAPI app (``create_app``).

Routes: ``POST /v1/chat/completions`` (streaming or not, ``n`` choices, logprobs, tools), ``GET
/v1/models``, ``GET /health``. With vLLM's ``"return_token_ids": true`` a response carries the
top-level ``prompt_token_ids`` and ``choices[i].token_ids``; streamed, the first chunk of each choice
carries ``prompt_token_ids`` and every chunk the ``token_ids`` of its delta, so a recorder captures
the exact tokens. Every response says which weights answered: ``system_fingerprint`` in the body
and the ``x-tracelearn-model-version`` header. Every error, validation included, is an OpenAI error
body (``{"error": {"message", "type", "param", "code"}}``) with status 400, 404, 413, 429, 500 or 503.

One request cannot hold the server for others: its body is bounded (``ServingLimits``: 413 beyond),
decoded, validated and tokenized on worker threads (the event loop, which answers ``/health`` and
streams every response, never runs them), its completion budget is bounded, and a request whose
client disconnects is cancelled at the engine's next step, streaming or not. Nor can many requests:
those waiting for the engine are bounded (``tracelearn.serving.engine_queue``; 429 with
``Retry-After`` beyond, before the prompt is tokenized), and ``/health`` reports the queue.

The app answers from an ``EngineSlot``: each request holds a lease on the engine that was current
when it arrived and is answered (and labelled) by that engine to its last byte, so the engine can be
swapped under a running server (``tracelearn.serving.alias_follower``) without failing a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tracelearn.serving.chat_format import (
    ChatFormatError,
    ChatPromptBuilder,
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
)
from tracelearn.serving.engine import (
    ContextLengthError,
    EngineClosedError,
    GenerationEngine,
    GenerationResult,
    StepOutput,
)
from tracelearn.serving.engine_queue import AdmissionQueue, QueuedRequest, QueueFullError, admit_chat_request
from tracelearn.serving.engine_slot import EngineLease, EngineSlot
from tracelearn.serving.logprobs import TokenTexts, logprobs_body
from tracelearn.serving.protocol import (
    MODEL_VERSION_HEADER,
    APIError,
    ChatCompletionRequest,
    ServingLimits,
    check_supported,
)
from tracelearn.serving.request_io import unless_disconnected
from tracelearn.serving.sampling import SamplingParams, TokenChoice, seed_for


@dataclass(frozen=True)
class _Plan:
    """What one chat request asks of the engine."""

    prompt_token_ids: list[int]
    params: list[SamplingParams]  # one per choice
    tool_names: frozenset[str] | None  # None: tool calls are not parsed


def _tool_calls_body(calls: Sequence[ToolCall], streamed: bool) -> list[dict[str, Any]]:
    return [
        {
            **({"index": index} if streamed else {}),
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for index, call in enumerate(calls)
    ]


def _tool_setup(request: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools to declare in the prompt and an instruction for ``required`` / named tool choices.

    The embedded server cannot constrain decoding to a tool call, so ``required`` and a named function
    are asked for in the system message: a request, not a guarantee (vLLM uses guided decoding).
    """
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return None, None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    if choice == "required":
        return tools, "You must call at least one of the functions above."
    if choice is not None and not isinstance(choice, str):
        named = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not named:
            raise APIError(f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
        return named, f"You must call the function {choice.function.name}."
    return tools, None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _merge_streams(
    streams: Sequence[AsyncIterator[StepOutput]],
) -> AsyncGenerator[tuple[int, StepOutput], None]:
    """Interleave the steps of several choices as they are produced, tagged with the choice index."""
    merged: asyncio.Queue[tuple[int, StepOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StepOutput]) -> None:
        try:
            async for step in stream:
                await merged.put((index, step))
        except Exception as error:
            await merged.put((index, error))
        await merged.put((index, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await merged.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:  # the client went away or a choice failed: stop generating the others
            task.cancel()


class ChatCompletions:
    """Turns validated chat requests into engine work and engine output into OpenAI responses."""

    def __init__(self, engine: GenerationEngine, served_model_name: str, accepted_names: Collection[str],
                 limits: ServingLimits) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.accepted_names = frozenset(accepted_names) | {served_model_name}
        self.limits = limits
        self.prompts = ChatPromptBuilder(engine.tokenizer)
        self.texts = TokenTexts(engine.tokenizer)

    def plan(self, request: ChatCompletionRequest) -> _Plan:
        """Check the request, render and tokenize its prompt, and fix each choice's budget and seed
        (blocking: tokenizing a long prompt takes seconds, so the API runs this on a worker thread)."""
        check_supported(request)
        if request.model not in self.accepted_names:
            raise APIError(
                f"The model `{request.model}` does not exist.", status_code=404, param="model", code="model_not_found"
            )
        tools, instruction = _tool_setup(request)
        messages = [message.model_dump(exclude_none=True) for message in request.messages]
        try:
            prompt = self.prompts.prompt_token_ids(messages, tools, instruction)
        except ChatFormatError as error:
            raise APIError(str(error), param="messages") from error
        budget = self._budget(len(prompt), request)
        temperature = 1.0 if request.temperature is None else request.temperature
        params = [
            SamplingParams(
                max_tokens=budget,
                temperature=temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                seed=None if request.seed is None else seed_for(request.seed, index),
                stop=request.stop_strings,
                stop_token_ids=tuple(request.stop_token_ids or ()),
                top_logprobs=request.top_logprobs or 0,
            )
            for index in range(request.n or 1)
        ]
        tool_names = frozenset(t["function"]["name"] for t in tools) if tools else None
        return _Plan(prompt, params, tool_names)

    def _budget(self, prompt_tokens: int, request: ChatCompletionRequest) -> int:
        """Each choice's completion budget: ``max_tokens``, or the server's default (both capped by the
        context left), refused when ``n`` choices of it exceed ``limits.max_request_tokens``."""
        requested = request.completion_budget
        try:
            budget = self.engine.check_fits(prompt_tokens, requested)
        except ContextLengthError as error:
            param = "messages" if requested is None else "max_tokens"
            raise APIError(str(error), param=param, code="context_length_exceeded") from error
        if requested is None:
            budget = min(budget, self.limits.default_max_tokens)
        choices, most = request.n or 1, self.limits.max_request_tokens
        if choices * budget > most:
            asked = f"max_tokens {requested}" if requested is not None else f"the default max_tokens {budget}"
            raise APIError(
                f"n {choices} x {asked} = {choices * budget} completion tokens, over this server's limit of {most} "
                f"per request; set max_tokens to at most {most // choices} or lower n",
                param="max_tokens" if requested is not None else "n", code="request_too_large",
            )
        return budget

    def _envelope(self, object_type: str, completion_id: str, created: int) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": object_type,
            "created": created,
            "model": self.served_model_name,
            "system_fingerprint": self.engine.model_version,
        }

    async def complete(self, request: ChatCompletionRequest, plan: _Plan,
                       on_admitted: Callable[[], None] | None = None) -> dict[str, Any]:
        """Generate every choice; cancelling this cancels them all. ``on_admitted`` is called as each
        choice joins the engine's batch."""
        results = await asyncio.gather(
            *(self.engine.generate(plan.prompt_token_ids, p, on_admitted) for p in plan.params)
        )
        # Logprob entries of many long choices take a while to build: off the event loop too.
        return await asyncio.to_thread(self._response_body, request, plan, results)

    def _response_body(
        self, request: ChatCompletionRequest, plan: _Plan, results: Sequence[GenerationResult]
    ) -> dict[str, Any]:
        body = self._envelope("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        body["choices"] = [self._choice(index, result, request, plan) for index, result in enumerate(results)]
        body["usage"] = _usage(len(plan.prompt_token_ids), sum(len(r.token_ids) for r in results))
        if request.return_token_ids:
            body["prompt_token_ids"] = plan.prompt_token_ids
        return body

    def _choice(
        self, index: int, result: GenerationResult, request: ChatCompletionRequest, plan: _Plan
    ) -> dict[str, Any]:
        calls: list[ToolCall] = []
        content: str | None = result.text
        if plan.tool_names is not None:
            content, calls = parse_tool_calls(result.text, plan.tool_names)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = _tool_calls_body(calls, streamed=False)
        logprobs = None
        if request.logprobs:
            tokens = zip(result.token_ids, result.logprobs, result.top_logprobs, strict=True)
            logprobs = logprobs_body([TokenChoice(*token) for token in tokens], self.texts)
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": "tool_calls" if calls else result.finish_reason,
        }
        if request.return_token_ids:
            choice["token_ids"] = result.token_ids
        return choice

    async def stream(self, request: ChatCompletionRequest, plan: _Plan,
                     on_admitted: Callable[[], None] | None = None) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, a chunk per generated token, optional usage
        (``on_admitted``: as ``complete``'s)."""
        envelope = self._envelope("chat.completion.chunk", f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps({**envelope, 'choices': choices, **usage_field, **extra})}\n\n"

        first = {"prompt_token_ids": plan.prompt_token_ids} if request.return_token_ids else {}
        for index in range(len(plan.params)):
            delta = {"role": "assistant", "content": ""}
            yield event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}], **first)
        tool_streams = [ToolCallStream(plan.tool_names) if plan.tool_names else None for _ in plan.params]
        completion_tokens = 0
        steps = [self.engine.stream(plan.prompt_token_ids, params, on_admitted) for params in plan.params]
        try:
            # aclosing: when the client disconnects, generation stops now, not when the GC gets to it.
            async with contextlib.aclosing(_merge_streams(steps)) as merged:
                async for index, step in merged:
                    completion_tokens += 1
                    choice = self._chunk_choice(index, step, request, tool_streams[index])
                    if choice is not None:
                        yield event([choice])
        except Exception as error:  # headers are sent: report the failure in the stream, as OpenAI does
            yield f"data: {json.dumps(_error_from(error).body())}\n\n"
        else:
            if include_usage:
                yield event([], usage=_usage(len(plan.prompt_token_ids), completion_tokens))
        yield "data: [DONE]\n\n"

    def _chunk_choice(
        self, index: int, step: StepOutput, request: ChatCompletionRequest, tools: ToolCallStream | None
    ) -> dict[str, Any] | None:
        text = tools.feed(step.text) if tools else step.text
        calls: list[ToolCall] = []
        if step.finish_reason is not None and tools:
            rest, calls = tools.finish()
            text += rest
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = _tool_calls_body(calls, streamed=True)
        finish = "tool_calls" if calls else step.finish_reason
        if not delta and finish is None and not request.logprobs and not request.return_token_ids:
            return None  # nothing a client could see
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs_body([step.token], self.texts) if request.logprobs else None,
            "finish_reason": finish,
        }
        if request.return_token_ids:
            choice["token_ids"] = [step.token.token_id]
        return choice


def _error_from(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineClosedError):
        return APIError(str(error), status_code=503, error_type="service_unavailable")
    return APIError(f"generation failed: {type(error).__name__}: {error}", status_code=500, error_type="server_error")


async def _released_after(body: AsyncIterator[str], lease: EngineLease,
                          queued: QueuedRequest) -> AsyncGenerator[str, None]:
    """``body``, then the lease and the queue place go back (also when the client disconnects mid-stream)."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        queued.leave()
        lease.release()


def create_app(
    engine: GenerationEngine | EngineSlot,
    served_model_name: str | None = None,
    aliases: Collection[str] = (),
    limits: ServingLimits | None = None,
    admission: AdmissionQueue | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (or over whichever engine an ``EngineSlot`` holds at
    each request). Requests may name the served model, the answering engine's ``model_id`` or any of
    ``aliases``; other names get 404 ``model_not_found``, as from vLLM. ``limits`` bound what one
    request may cost (``ServingLimits()`` by default), ``admission`` how many may wait for the engine
    (``AdmissionQueue()``: 256 requests, by default).
    """
    limits = limits or ServingLimits()
    admission = admission or AdmissionQueue()
    slot = engine if isinstance(engine, EngineSlot) else EngineSlot(engine)
    served = served_model_name or slot.current.model_id
    # One ChatCompletions per engine (its prompt builder and token texts belong to that tokenizer);
    # weak keys, so a retired engine is not kept alive by this cache.
    per_engine: weakref.WeakKeyDictionary[GenerationEngine, ChatCompletions] = weakref.WeakKeyDictionary()

    def completions_for(answering: GenerationEngine) -> ChatCompletions:
        found = per_engine.get(answering)
        if found is None:
            found = per_engine[answering] = ChatCompletions(answering, served, {answering.model_id, *aliases},
                                                            limits)
        return found

    def version_header(answering: GenerationEngine | None = None) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: (answering or slot.current).model_version}

    created = int(time.time())
    app = FastAPI(title="tracelearn embedded model server")

    def error_response(error: APIError) -> JSONResponse:
        headers = version_header()
        if isinstance(error, QueueFullError):
            headers["retry-after"] = str(error.retry_after_s)
        return JSONResponse(error.body(), status_code=error.status_code, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return error_response(APIError(str(error.detail), status_code=error.status_code, code=code))

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return error_response(_error_from(error))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = slot.status()
        return {
            "status": "ok",
            "model": served,
            "model_version": status.model_version,
            "following": status.following,
            "swaps": status.swaps,
            "last_swap_at": status.last_swap_at,
            "last_swap_error": status.last_swap_error,
            "last_swap_error_at": status.last_swap_error_at,
            "draining_engines": status.draining,
            "queue": dataclasses.asdict(admission.depth()),
            "torch_threads": slot.current.torch_threads,
        }

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        current = slot.current
        card = {
            "id": served,
            "object": "model",
            "created": created,
            "owned_by": "tracelearn",
            "root": current.model_id,
            "max_model_len": current.context_length,
            "model_version": current.model_version,
        }
        return JSONResponse({"object": "list", "data": [card]}, headers=version_header(current))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http: Request) -> Response:
        # Decoding, validating and tokenizing run on worker threads: a 20 MB prompt takes seconds.
        request, queued = await admit_chat_request(http, admission, limits)
        lease = slot.lease()
        streaming = False
        try:
            completions = completions_for(lease.engine)
            plan = await asyncio.to_thread(completions.plan, request)
            queued.hold(len(plan.params), plan.params[0].max_tokens)  # the budget as planned: no more
            headers = version_header(lease.engine)
            if request.stream:
                body = _released_after(completions.stream(request, plan, queued.choice_admitted), lease, queued)
                streaming = True  # from here the body owns the lease and the queue place
                return StreamingResponse(body, media_type="text/event-stream", headers=headers)
            completed = await unless_disconnected(http, completions.complete(request, plan, queued.choice_admitted))
            if completed is None:
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            return await asyncio.to_thread(JSONResponse, completed, headers=headers)
        finally:
            if not streaming:
                queued.leave()
                lease.release()

    return app
