"""Token ids and logprobs from OpenAI-compatible model servers, recorded on the LLM call's span.

``TokenIdsInstrumentor`` (entry point ``tracelearn_token_ids``) owns one thing: for every chat
completion sent over ``httpx`` (the ``openai`` SDK, and what is built on it or on ``httpx``: LangChain,
LiteLLM, Pydantic AI...), it asks the server for the token ids it generated (``return_token_ids: true``,
vLLM's extension) and their logprobs (``logprobs: true``), reads them back from the HTTP response
(top-level ``prompt_token_ids``, ``choices[0].token_ids``, ``choices[0].logprobs.content``; for a
stream, accumulated over its ``data:`` events) and records them, with the response's ``system_fingerprint``
(``openai.response.system_fingerprint``: which weights answered) and ``tracelearn.llm.token_ids_status``,
on the span current while the request is sent, when that is an LLM instrumentation's span (Traceloop's
``openai.chat``, the official ``chat {model}``, OpenInference's ``openinference.span.kind=LLM``, Pydantic
AI's chat span). Without one it writes a ``tracelearn.token_ids`` child span carrying
``gen_ai.response.id`` so the pipeline can join the two by response id, and says once per process
which instrumentation to install (``missing_instrumentation``). Ids a server did not return are never
made up: the status says why.

Where it hooks, and why there: ``Client.send`` / ``AsyncClient.send`` of ``httpx2`` (what ``openai`` 3
sends through) and of ``httpx`` (a legacy client handed to the SDK, other libraries), wrapped when those
modules are imported. Every wrapper of the SDK ends there: OpenInference wraps ``OpenAI.request`` (the
subclass attribute) around the SDK's original ``request``, which bypassed a hook on
``SyncAPIClient.request``; Langfuse and Sentry wrap resource methods; a user's subclass may override
``request``. LLM instrumentations keep their span current while the request runs, so the hook sees the
innermost LLM span whatever order the instrumentors were loaded in. It acts only on a POST whose path
ends in ``/chat/completions`` with a JSON object body, and adds the fields by splicing them into the
body's bytes (no JSON round trip; the body is parsed only when it already names one of them, and then
the caller's value wins). A complete response body is parsed once more (orjson); a stream's byte
stream is tapped and its ``data:`` events parsed as they pass, without changing what the consumer
reads, and the ids are recorded at ``[DONE]`` (or at the stream's end), before the consumer sees the
stream end and the LLM instrumentation ends its span.

``TRACELEARN_TOKEN_IDS`` (or ``instrument(mode=...)``) decides whom to ask: ``on`` every server,
``off`` none, ``auto`` (default) only servers that are ours to ask: loopback and private addresses,
``localhost`` and ``*.localhost`` / ``*.local`` / ``*.internal`` names and single-label names
(container and cluster service names), decided from the URL alone, never by a DNS lookup. A hosted
API never receives the extra parameter in ``auto``. A server that answers the first asking request
with 400/422 (or any request with an error naming the parameter) is remembered for the process, the
request is sent again without the extra fields inside the hook (the client never sees the 400), and
that server is not asked again.

Every hook catches its own errors and logs the first one of each kind: capture never breaks the agent.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import wrapt
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, unwrap

from tracelearn.instrumentation.missing_instrumentation import advise_llm_instrumentation, forget_advice
from tracelearn.instrumentation.token_id_responses import ResponseReader, guarded, report_once, tap_types
from tracelearn.instrumentation.token_id_responses import TokenIdsCapture as TokenIdsCapture  # the gateway's too
from tracelearn.schemas import semconv as sc
from tracelearn.settings import SettingError
from tracelearn.settings.variables import TOKEN_IDS

ENV_MODE: Final = TOKEN_IDS.name
DEFAULT_MODE: Final = "auto"

# The fields we add to a chat-completions body; a caller's own value for any of them wins.
RETURN_TOKEN_IDS: Final = "return_token_ids"
LOGPROBS: Final = "logprobs"
TOP_LOGPROBS: Final = "top_logprobs"
CHAT_COMPLETIONS_PATH: Final = "/chat/completions"
# The HTTP client modules whose Client.send / AsyncClient.send carry the hook (wrapped when imported).
HTTP_CLIENT_MODULES: Final = ("httpx2", "httpx")

_PRIVATE_SUFFIXES: Final = (".localhost", ".local", ".internal")
_LLM_OPERATIONS: Final = frozenset({"chat", "text_completion", "completion", "generate_content"})
_REJECTION_STATUSES: Final = frozenset({400, 422})
_CALLER_FIELD_NAMES: Final = tuple(f'"{name}"'.encode() for name in (RETURN_TOKEN_IDS, LOGPROBS, TOP_LOGPROBS))
# A non-empty JSON object's opening brace (its first member's name follows): where the fields go in.
_OBJECT_START: Final = re.compile(rb"[ \t\r\n]*\{(?=[ \t\r\n]*\")")
_log = logging.getLogger(__name__)


# --- Whom to ask ------------------------------------------------------------------------------------


def token_ids_mode(value: str | None) -> str:
    """``on`` / ``off`` / ``auto`` from a setting (``None``: ``$TRACELEARN_TOKEN_IDS``); unset or unknown
    values fall back to ``auto``."""
    try:
        return TOKEN_IDS.value(None if value is None else {ENV_MODE: value})
    except SettingError as error:
        _log.warning("%s; using %r", error, DEFAULT_MODE)
        return DEFAULT_MODE


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


def _asks_host(host: str, mode: str) -> bool:
    return mode == "on" or (mode == "auto" and is_private_host(host))


def should_request_token_ids(base_url: str, mode: str) -> bool:
    """The ``TRACELEARN_TOKEN_IDS`` rule for one server, before anything was learned about it."""
    return _asks_host(urlsplit(base_url).hostname or "", mode)


class _ServerMemory:
    """What the process learned about servers, by base URL (set operations are atomic in CPython)."""

    def __init__(self) -> None:
        self.rejecting: set[str] = set()
        self.accepted: set[str] = set()

    def forget(self) -> None:
        self.rejecting.clear()
        self.accepted.clear()


_servers = _ServerMemory()


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
        or attributes.get(sc.OPENINFERENCE_SPAN_KIND) == sc.OPENINFERENCE_KIND_LLM
    )


@dataclass
class _Call:
    """One chat-completions request: what is sent first, where to record, whether the server was asked."""

    tracer: trace.Tracer
    server: str
    span: trace.Span
    on_llm_span: bool
    context: otel_context.Context
    request: Any  # the caller's request, or a copy carrying the fields we add
    asked: bool
    injected: tuple[str, ...] = ()

    def may_be_rejection(self, response: Any) -> bool:
        return bool(self.injected) and response.status_code in _REJECTION_STATUSES

    def is_rejection(self, response: Any) -> bool:
        """Whether the (read) error ``response`` refuses the fields we added (then remember it)."""
        try:
            names_ours = any(name in response.text for name in self.injected)
            if not names_ours and self.server in _servers.accepted:
                return False  # a server that took the fields before refuses something else
            _servers.rejecting.add(self.server)
            _log.info(
                "token-id capture: %s rejected %s (HTTP %s); retrying without them and not asking it again",
                self.server,
                ", ".join(self.injected),
                response.status_code,
            )
            self.asked = False
            self.injected = ()
            return True
        except Exception as error:
            report_once("reading a rejection", error)
            return False

    def observe(self, response: Any, streamed: bool, tap: type) -> None:
        """Read a successful response's ids: now from a read body, or from a stream as it is consumed."""
        if not 200 <= response.status_code < 300:
            return  # the agent gets the error; there is nothing to record
        if self.injected:
            _servers.accepted.add(self.server)
        if not self.asked:
            self.record(None)
            return
        reader = ResponseReader(self.record, response.headers.get("content-type", ""))
        if streamed:
            reader.expect_encoding(response.headers.get("content-encoding", ""))
            response.stream = tap(response.stream, reader)
        else:
            reader.feed(response.content)  # already decoded by the client
            reader.finish()

    def record(self, capture: TokenIdsCapture | None) -> None:
        """Write what was captured on the LLM span, or on a ``tracelearn.token_ids`` child span.

        ``None`` means the server was not asked: only the LLM span learns why (there is nothing to join).
        """
        if capture is None:
            if self.on_llm_span:
                status = sc.TOKEN_IDS_REJECTED if self.server in _servers.rejecting else sc.TOKEN_IDS_NOT_REQUESTED
                self.span.set_attribute(sc.TOKEN_IDS_STATUS, status)
            return
        attributes = capture.attributes()
        if self.on_llm_span:
            self.span.set_attributes(attributes)
            return
        own = self.tracer.start_span(
            sc.SPAN_TOKEN_IDS, context=self.context, attributes={sc.SPAN_TYPE: sc.TYPE_TOKEN_IDS, **attributes}
        )
        own.end()


def _caller_fields(body: bytes) -> dict[str, Any] | None:
    """The caller's own values of the fields we add (none, usually), or None if the body is not a JSON object."""
    if not any(name in body for name in _CALLER_FIELD_NAMES):
        return {}  # three substring scans instead of parsing every request body
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # not JSON: the server will say so to the caller
    if not isinstance(parsed, dict):
        return None
    return {name: parsed[name] for name in (RETURN_TOKEN_IDS, LOGPROBS, TOP_LOGPROBS) if name in parsed}


def _with_fields(request: Any, at: int, added: Sequence[str]) -> Any:
    """A copy of ``request`` whose JSON body carries ``"<name>":true`` for each added field, at ``at``."""
    body: bytes = request.content
    content = body[:at] + b"".join(b'"%s":true,' % name.encode() for name in added) + body[at:]
    # Headers given as a Headers object are copied as they are (not normalized again).
    copy = type(request)(
        request.method, request.url, headers=request.headers, content=content, extensions=request.extensions
    )
    copy.headers["Content-Length"] = str(len(content))
    return copy


def _start_call(tracer: trace.Tracer, mode: str, request: Any) -> _Call | None:
    """A ``_Call`` for a chat-completions POST (sending our fields when we ask), else ``None``."""
    url = request.url
    if request.method != "POST" or not url.path.rstrip("/").endswith(CHAT_COMPLETIONS_PATH):
        return None
    if request.headers.get("content-encoding"):
        return None  # a compressed body is not ours to rewrite
    try:
        body = request.content
    except RuntimeError:  # httpx's RequestNotRead: a streamed upload, not a chat request we can read
        return None
    start = _OBJECT_START.match(body)
    caller = _caller_fields(body) if start is not None else None
    if start is None or caller is None:
        return None
    server = str(url).split("?", 1)[0].rstrip("/").removesuffix(CHAT_COMPLETIONS_PATH)
    span = trace.get_current_span()
    on_llm_span = _is_llm_span(span)
    if not on_llm_span:
        guarded("saying what to install", advise_llm_instrumentation, server, request.headers.get("user-agent", ""))
    call = _Call(
        tracer=tracer,
        server=server,
        span=span,
        on_llm_span=on_llm_span,
        context=otel_context.get_current(),
        request=request,
        asked=bool(caller.get(RETURN_TOKEN_IDS)),
    )
    if RETURN_TOKEN_IDS in caller or server in _servers.rejecting or not _asks_host(url.host, mode):
        return call  # the caller decided, or we do not ask: we only read what comes back
    added = (RETURN_TOKEN_IDS,) if {LOGPROBS, TOP_LOGPROBS} & caller.keys() else (RETURN_TOKEN_IDS, LOGPROBS)
    call.request = _with_fields(request, start.end(), added)
    call.injected = added
    call.asked = True
    return call


def _prepared(tracer: trace.Tracer, mode: str, request: Any) -> _Call | None:
    if not is_instrumentation_enabled():  # inside suppress_instrumentation(): leave the call alone
        return None
    try:
        return _start_call(tracer, mode, request)
    except Exception as error:
        report_once("preparing a request", error)
        return None


# --- The hook on the HTTP clients -------------------------------------------------------------------


def _split_send_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``send(request, *, stream, auth, follow_redirects)`` as (request, other args, keyword args)."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("request", None), (), rest


def _send_wrappers(tracer: trace.Tracer, mode: str, module: ModuleType) -> tuple[Callable[..., Any], ...]:
    """The wrappers of ``module.Client.send`` and ``module.AsyncClient.send``."""
    sync_tap, async_tap = tap_types(module)

    def send(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        request, rest, options = _split_send_arguments(args, kwargs)
        call = _prepared(tracer, mode, request) if request is not None else None
        if call is None:
            return wrapped(*args, **kwargs)
        response = wrapped(call.request, *rest, **options)
        if call.may_be_rejection(response):
            response.read()
            if call.is_rejection(response):
                response.close()
                response = wrapped(request, *rest, **options)
        guarded("reading a response", call.observe, response, bool(options.get("stream")), sync_tap)
        return response

    async def async_send(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        request, rest, options = _split_send_arguments(args, kwargs)
        call = _prepared(tracer, mode, request) if request is not None else None
        if call is None:
            return await wrapped(*args, **kwargs)
        response = await wrapped(call.request, *rest, **options)
        if call.may_be_rejection(response):
            await response.aread()
            if call.is_rejection(response):
                await response.aclose()
                response = await wrapped(request, *rest, **options)
        guarded("reading a response", call.observe, response, bool(options.get("stream")), async_tap)
        return response

    return send, async_send


class _Hooks:
    """What ``instrument()`` set up: the tracer and mode the wrappers use, and the classes wrapped."""

    def __init__(self) -> None:
        self.active = False
        self.tracer: trace.Tracer | None = None
        self.mode = DEFAULT_MODE
        self.wrapped: list[type] = []


_hooks = _Hooks()


def _wrap_http_client(module: ModuleType) -> None:
    """Wrap an HTTP client module's ``send`` methods (a post-import hook: it must never raise)."""
    try:
        if not _hooks.active or _hooks.tracer is None or module.Client in _hooks.wrapped:
            return  # uninstrumented since, or already wrapped (``httpx`` may be an alias of ``httpx2``)
        send, async_send = _send_wrappers(_hooks.tracer, _hooks.mode, module)
        wrapt.wrap_function_wrapper(module.Client, "send", send)
        wrapt.wrap_function_wrapper(module.AsyncClient, "send", async_send)
        _hooks.wrapped += [module.Client, module.AsyncClient]
    except Exception as error:
        report_once(f"hooking {module.__name__}", error)


# --- The instrumentor -------------------------------------------------------------------------------


class TokenIdsInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Asks OpenAI-compatible servers for token ids and logprobs and records them on the LLM span.

    ``instrument(tracer_provider=..., mode="on"|"off"|"auto")``; ``mode`` defaults to
    ``TRACELEARN_TOKEN_IDS`` (``auto`` when unset). ``uninstrument()`` also forgets which servers
    rejected or accepted the extra fields, and that the missing-instrumentation line was said.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # nothing is imported: the HTTP clients are hooked if and when the agent imports them

    def _instrument(self, **kwargs: Any) -> None:
        _hooks.mode = token_ids_mode(kwargs.get("mode"))
        _hooks.tracer = trace.get_tracer(__name__, tracer_provider=kwargs.get("tracer_provider"))
        _hooks.active = True
        for name in HTTP_CLIENT_MODULES:
            wrapt.register_post_import_hook(_wrap_http_client, name)  # runs now if already imported

    def _uninstrument(self, **kwargs: Any) -> None:
        _hooks.active = False
        for client in _hooks.wrapped:
            unwrap(client, "send")
        _hooks.wrapped.clear()
        _servers.forget()
        forget_advice()
