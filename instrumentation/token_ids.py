"""Token ids and logprobs from OpenAI-compatible model servers, recorded on the LLM call's span.

``TokenIdsInstrumentor`` (entry point ``tracelearn_token_ids``) owns one thing: for every chat
completion an ``openai`` client sends, it asks the server for the token ids it generated
(``return_token_ids: true``, vLLM's extension) and their logprobs (``logprobs: true``), reads them
back (top-level ``prompt_token_ids``, ``choices[0].token_ids``, ``choices[0].logprobs.content``,
accumulated across chunks when streaming) and records them with ``tracelearn.llm.token_ids_status``
on the span of the LLM instrumentation (Traceloop's ``openai.chat``, the official ``chat {model}``).
Without such a span it writes a ``tracelearn.token_ids`` child span carrying ``gen_ai.response.id``
so the pipeline can join the two by response id. Ids a server did not return are never made up:
the status says why they are missing.

Where it hooks: ``openai._base_client.SyncAPIClient.request`` and ``AsyncAPIClient.request``, the
single path every resource method goes through. LLM instrumentations wrap
``Completions.create`` one level up and keep their span current while the request runs, so our
hook always runs inside their span whatever order the instrumentors were loaded in. ``request`` is
looked up on the client at call time (``post`` is not: resources bind it when the client is built),
so clients created before ``instrument()`` are covered too. For streams, the chunk iterator of the
``Stream`` object is wrapped; it is exhausted before the LLM instrumentation's stream wrapper sees
``StopIteration`` and ends its span, so the span is still recording when the ids are written.

``TRACELEARN_TOKEN_IDS`` (or ``instrument(mode=...)``) decides whom to ask: ``on`` every server,
``off`` none, ``auto`` (default) only servers that are ours to ask: loopback and private addresses,
``localhost`` and ``*.localhost`` / ``*.local`` / ``*.internal`` names and single-label names
(container and cluster service names), decided from the URL alone, never by a DNS lookup. A hosted
API never receives the extra parameter in ``auto``. A server that answers the first asking request
with 400/422 (or any request with an error naming the parameter) is remembered for the process,
the request is sent again without the extra fields, and it is not asked again.

Every hook catches its own errors and logs the first one of each kind: capture never breaks the agent.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap
from wrapt import wrap_function_wrapper

from tracelearn.schemas import semconv as sc

ENV_MODE: Final = "TRACELEARN_TOKEN_IDS"
MODES: Final = ("on", "off", "auto")
DEFAULT_MODE: Final = "auto"

# The fields we add to a chat-completions body; a caller's own value for any of them wins.
RETURN_TOKEN_IDS: Final = "return_token_ids"
LOGPROBS: Final = "logprobs"
TOP_LOGPROBS: Final = "top_logprobs"
CHAT_COMPLETIONS_PATH: Final = "/chat/completions"

_PRIVATE_SUFFIXES: Final = (".localhost", ".local", ".internal")
_LLM_OPERATIONS: Final = frozenset({"chat", "text_completion", "completion", "generate_content"})
_REJECTION_STATUSES: Final = frozenset({400, 422})

_log = logging.getLogger(__name__)


# --- Whom to ask ------------------------------------------------------------------------------------


def token_ids_mode(value: str | None) -> str:
    """``on`` / ``off`` / ``auto`` from a setting; unset or unknown values fall back to ``auto``."""
    if value is None or not value.strip():
        return DEFAULT_MODE
    mode = value.strip().lower()
    if mode not in MODES:
        _log.warning("%s=%r is not one of %s; using %r", ENV_MODE, value, "/".join(MODES), DEFAULT_MODE)
        return DEFAULT_MODE
    return mode


def is_private_host(host: str) -> bool:
    """Whether a URL host is loopback, private or a local-network name (no DNS lookup is made)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if not name:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        # A name without a dot cannot be a public internet host: it is a container, compose or
        # cluster service name resolved on the local network.
        return name == "localhost" or name.endswith(_PRIVATE_SUFFIXES) or "." not in name
    return address.is_loopback or address.is_private or address.is_link_local


def should_request_token_ids(base_url: str, mode: str) -> bool:
    """The ``TRACELEARN_TOKEN_IDS`` rule for one server, before anything was learned about it."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    host = urlsplit(base_url).hostname
    return host is not None and is_private_host(host)


class _ServerMemory:
    """What the process learned about servers, by base URL (set operations are atomic in CPython)."""

    def __init__(self) -> None:
        self.rejecting: set[str] = set()
        self.accepted: set[str] = set()

    def forget(self) -> None:
        self.rejecting.clear()
        self.accepted.clear()


_servers = _ServerMemory()
_reported: set[str] = set()


def _report(where: str, error: BaseException) -> None:
    """Log a hook's failure once per kind (then at debug level): the agent's call goes on."""
    if where in _reported:
        _log.debug("token-id capture: %s failed again: %r", where, error)
        return
    _reported.add(where)
    _log.warning("token-id capture: %s failed (%r); the call goes on without token ids", where, error, exc_info=error)


# --- Reading responses ------------------------------------------------------------------------------


def _field(obj: Any, name: str) -> Any:
    """A field of a parsed response (pydantic model with extra fields kept) or of a plain dict."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


_INT_TYPES: Final = frozenset({int})
_FLOAT_TYPES: Final = frozenset({float})


def _int_list(value: Any) -> list[int] | None:
    """Token ids as a list, or None unless ``value`` is a sequence of ints (``bool`` is not one)."""
    if type(value) in (list, tuple) and set(map(type, value)) <= _INT_TYPES:
        return list(value)  # what a parsed response holds (hundreds of ids per call), checked at C speed
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str | bytes)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    return None


def _choice_zero_logprobs(choice: Any) -> list[float] | None:
    content = _field(_field(choice, "logprobs"), "content")
    if not isinstance(content, Sequence) or isinstance(content, str):
        return None
    values = [_field(entry, "logprob") for entry in content]
    if set(map(type, values)) <= _FLOAT_TYPES:
        return values  # the common case, checked at C speed; ``float(v)`` of a float is ``v``
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    return None


@dataclass
class TokenIdsCapture:
    """What a response (or the chunks of a stream) carried for choice 0."""

    response_id: str | None = None
    prompt_token_ids: list[int] | None = None
    response_token_ids: list[int] | None = None
    response_logprobs: list[float] | None = None
    choice_count: int = 0

    def add_response(self, response: Any) -> None:
        """Read a complete (non-streamed) chat completion."""
        self._add_top_level(response)
        for choice in _field(response, "choices") or ():
            self.choice_count += 1
            if _field(choice, "index") in (0, None) and self.response_token_ids is None:
                self.response_token_ids = _int_list(_field(choice, "token_ids"))
                self.response_logprobs = _choice_zero_logprobs(choice)

    def add_chunk(self, chunk: Any) -> None:
        """Read one streamed chunk: vLLM sends prompt ids once, then each delta's own ids and logprobs."""
        self._add_top_level(chunk)
        for choice in _field(chunk, "choices") or ():
            index = _field(choice, "index")
            if isinstance(index, int):
                self.choice_count = max(self.choice_count, index + 1)
            if index not in (0, None):
                continue
            ids = _int_list(_field(choice, "token_ids"))
            if ids is not None:
                self.response_token_ids = (self.response_token_ids or []) + ids
            logprobs = _choice_zero_logprobs(choice)
            if logprobs is not None:
                self.response_logprobs = (self.response_logprobs or []) + logprobs

    def _add_top_level(self, obj: Any) -> None:
        if self.response_id is None:
            response_id = _field(obj, "id")
            if isinstance(response_id, str) and response_id:
                self.response_id = response_id
        if self.prompt_token_ids is None:
            self.prompt_token_ids = _int_list(_field(obj, "prompt_token_ids"))

    def status(self) -> str:
        complete = self.prompt_token_ids is not None and self.response_token_ids is not None
        status: str = sc.TOKEN_IDS_FROM_SERVER if complete else sc.TOKEN_IDS_MISSING
        return status

    def attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {sc.TOKEN_IDS_STATUS: self.status()}
        if self.response_id is not None:
            attributes[sc.GEN_AI_RESPONSE_ID] = self.response_id
        if self.prompt_token_ids is not None:
            attributes[sc.PROMPT_TOKEN_IDS] = self.prompt_token_ids
        if self.response_token_ids is not None:
            attributes[sc.RESPONSE_TOKEN_IDS] = self.response_token_ids
        if self.response_logprobs is not None:
            attributes[sc.RESPONSE_LOGPROBS] = self.response_logprobs
        if self.choice_count > 1:
            attributes[sc.RESPONSE_CHOICE_COUNT] = self.choice_count
        return attributes


# --- One chat-completions request -------------------------------------------------------------------


def _is_llm_span(span: trace.Span) -> bool:
    """Whether ``span`` is a recording span of an LLM instrumentation (not a user's or a tool's span)."""
    if not span.is_recording():
        return False
    attributes = getattr(span, "attributes", None)
    if not isinstance(attributes, Mapping):
        return False
    return (
        attributes.get(sc.GEN_AI_OPERATION_NAME) in _LLM_OPERATIONS
        or sc.GEN_AI_REQUEST_MODEL in attributes
        or sc.TRACELOOP_LLM_REQUEST_TYPE in attributes
    )


def _options_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``FinalRequestOptions`` of ``request(cast_to, options, *, stream, stream_cls)``."""
    return kwargs["options"] if "options" in kwargs else (args[1] if len(args) > 1 else None)


def _with_options(args: tuple[Any, ...], kwargs: dict[str, Any], options: Any) -> tuple[Any, ...]:
    if "options" in kwargs:
        kwargs["options"] = options
        return args
    return (args[0], options, *args[2:])


@dataclass
class _Call:
    """One chat-completions request: where to record, and whether the server was asked."""

    tracer: trace.Tracer
    server: str
    span: trace.Span
    context: otel_context.Context
    asked: bool
    injected: tuple[str, ...] = ()
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def is_rejection(self, error: Exception) -> bool:
        """Whether ``error`` is the server refusing the fields we added (then remember it)."""
        try:
            import openai

            if not self.injected or not isinstance(error, openai.APIStatusError):
                return False
            if error.status_code not in _REJECTION_STATUSES:
                return False
            text = f"{error.message} {error.body}"
            names_ours = any(name in text for name in self.injected)
            if not names_ours and self.server in _servers.accepted:
                return False  # a server that took the fields before refuses something else
            _servers.rejecting.add(self.server)
            _log.info(
                "token-id capture: %s rejected %s (HTTP %s); retrying without them and not asking it again",
                self.server,
                ", ".join(self.injected),
                error.status_code,
            )
            self.asked = False
            self.injected = ()
            return True
        except Exception as failure:
            _report("reading a rejection", failure)
            return False

    def accepted(self) -> None:
        if self.injected:
            _servers.accepted.add(self.server)

    def record(self, capture: TokenIdsCapture | None) -> None:
        """Write what was captured on the LLM span, or on a ``tracelearn.token_ids`` child span.

        ``None`` means the server was not asked: only the LLM span learns why (there is nothing to join).
        """
        if capture is None:
            status = sc.TOKEN_IDS_REJECTED if self.server in _servers.rejecting else sc.TOKEN_IDS_NOT_REQUESTED
            if _is_llm_span(self.span):
                self.span.set_attribute(sc.TOKEN_IDS_STATUS, status)
            return
        attributes = capture.attributes()
        if _is_llm_span(self.span):
            self.span.set_attributes(attributes)
            return
        own = self.tracer.start_span(
            sc.SPAN_TOKEN_IDS, context=self.context, attributes={sc.SPAN_TYPE: sc.TYPE_TOKEN_IDS, **attributes}
        )
        own.end()

    def record_response(self, response: Any) -> None:
        capture = None
        if self.asked:
            capture = TokenIdsCapture()
            capture.add_response(response)
        self.record(capture)


def _start_call(
    tracer: trace.Tracer, mode: str, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Call | None:
    """A ``_Call`` for a chat-completions POST (with the fields added when we ask), else ``None``."""
    options = _options_of(args, kwargs)
    url = getattr(options, "url", None)
    if not isinstance(url, str) or str(getattr(options, "method", "")).lower() != "post":
        return None
    target = urlsplit(url)
    if not ("/" + target.path.strip("/")).endswith(CHAT_COMPLETIONS_PATH):
        return None
    server = url if target.scheme else str(instance.base_url)
    server = server.split("?", 1)[0].removesuffix("/").removesuffix(CHAT_COMPLETIONS_PATH)
    body = options.json_data
    extra = options.extra_json or {}
    if not isinstance(body, Mapping) or not isinstance(extra, Mapping):
        return None
    call = _Call(
        tracer=tracer,
        server=server,
        span=trace.get_current_span(),
        context=otel_context.get_current(),
        asked=bool({**body, **extra}.get(RETURN_TOKEN_IDS)),
        args=args,
        kwargs=kwargs,
    )
    if RETURN_TOKEN_IDS in body or RETURN_TOKEN_IDS in extra:
        return call  # the caller decided, either way; we only read what comes back
    if server in _servers.rejecting or not should_request_token_ids(server, mode):
        return call
    added = {RETURN_TOKEN_IDS: True}
    if not {LOGPROBS, TOP_LOGPROBS} & (body.keys() | extra.keys()):
        added[LOGPROBS] = True
    injected_options = options.model_copy()
    injected_options.json_data = {**body, **added}
    call.kwargs = dict(kwargs)
    call.args = _with_options(args, call.kwargs, injected_options)
    call.injected = tuple(added)
    call.asked = True
    return call


# --- Observing results ------------------------------------------------------------------------------


def _is_raw_response(result: Any) -> bool:
    """``with_raw_response`` (LangChain uses it) and ``with_streaming_response`` wrappers.

    We read them through ``parse()``, which caches its result: the caller's own ``parse()`` later
    returns the same object (for a stream, the one whose chunks we tap).
    """
    from openai._legacy_response import LegacyAPIResponse
    from openai._response import BaseAPIResponse

    return isinstance(result, LegacyAPIResponse | BaseAPIResponse)


def _observe_stream(stream: Any, call: _Call) -> None:
    """Tap the chunks of an ``openai.Stream``; record when it is exhausted (its consumer's spans still open)."""
    inner: Iterator[Any] = stream._iterator

    def chunks() -> Iterator[Any]:
        capture = TokenIdsCapture() if call.asked else None
        for chunk in inner:
            if capture is not None:
                _guarded("reading a stream chunk", capture.add_chunk, chunk)
            yield chunk
        _guarded("recording a stream", call.record, capture)

    stream._iterator = chunks()


def _observe_async_stream(stream: Any, call: _Call) -> None:
    """``_observe_stream`` for ``openai.AsyncStream``."""
    inner: AsyncIterator[Any] = stream._iterator

    async def chunks() -> AsyncIterator[Any]:
        capture = TokenIdsCapture() if call.asked else None
        async for chunk in inner:
            if capture is not None:
                _guarded("reading a stream chunk", capture.add_chunk, chunk)
            yield chunk
        _guarded("recording a stream", call.record, capture)

    stream._iterator = chunks()


def _observe_parsed(parsed: Any, call: _Call) -> None:
    import openai

    if isinstance(parsed, openai.Stream):
        _observe_stream(parsed, call)
    elif isinstance(parsed, openai.AsyncStream):
        _observe_async_stream(parsed, call)
    else:
        call.record_response(parsed)


def _guarded(where: str, hook: Callable[..., Any], *args: Any) -> None:
    try:
        hook(*args)
    except Exception as error:
        _report(where, error)


# --- The instrumentor -------------------------------------------------------------------------------


class TokenIdsInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Asks OpenAI-compatible servers for token ids and logprobs and records them on the LLM span.

    ``instrument(tracer_provider=..., mode="on"|"off"|"auto")``; ``mode`` defaults to
    ``TRACELEARN_TOKEN_IDS`` (``auto`` when unset). ``uninstrument()`` also forgets which servers
    rejected or accepted the extra fields.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("openai >= 1.0",)

    def _instrument(self, **kwargs: Any) -> None:
        mode = token_ids_mode(kwargs.get("mode") or os.environ.get(ENV_MODE))
        tracer = trace.get_tracer(__name__, tracer_provider=kwargs.get("tracer_provider"))

        def request(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            call = _prepared(tracer, mode, instance, args, kwargs)
            if call is None:
                return wrapped(*args, **kwargs)
            try:
                result = wrapped(*call.args, **call.kwargs)
            except Exception as error:
                if not call.is_rejection(error):
                    raise
                result = wrapped(*args, **kwargs)
            try:
                call.accepted()
                _observe_parsed(result.parse() if _is_raw_response(result) else result, call)
            except Exception as error:
                _report("reading a response", error)
            return result

        async def async_request(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            call = _prepared(tracer, mode, instance, args, kwargs)
            if call is None:
                return await wrapped(*args, **kwargs)
            try:
                result = await wrapped(*call.args, **call.kwargs)
            except Exception as error:
                if not call.is_rejection(error):
                    raise
                result = await wrapped(*args, **kwargs)
            try:
                call.accepted()
                parsed = result.parse() if _is_raw_response(result) else result
                _observe_parsed(await parsed if inspect.isawaitable(parsed) else parsed, call)
            except Exception as error:
                _report("reading a response", error)
            return result

        wrap_function_wrapper("openai._base_client", "SyncAPIClient.request", request)
        wrap_function_wrapper("openai._base_client", "AsyncAPIClient.request", async_request)

    def _uninstrument(self, **kwargs: Any) -> None:
        from openai._base_client import AsyncAPIClient, SyncAPIClient

        unwrap(SyncAPIClient, "request")
        unwrap(AsyncAPIClient, "request")
        _servers.forget()


def _prepared(tracer: trace.Tracer, mode: str, instance: Any, args: Any, kwargs: Any) -> _Call | None:
    if not is_instrumentation_enabled():  # inside suppress_instrumentation(): leave the call alone
        return None
    try:
        return _start_call(tracer, mode, instance, tuple(args), dict(kwargs))
    except Exception as error:
        _report("preparing a request", error)
        return None
