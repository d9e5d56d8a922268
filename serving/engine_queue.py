"""The bound on chat requests waiting for the engine (``tracelearn serve --max-queued``): ``AdmissionQueue``.

Without it, a client that opens thousands of requests makes every other client's request wait
without limit and the server's memory grow with them. A request is *queued* from the moment its body
has been read until each of its ``n`` choices has been admitted into the engine's batch (or the
request ended): while it is parsed and its prompt tokenized, and while its choices wait for a row.
Running requests are already bounded (the engine decodes at most ``max_batch_size`` rows); queued
ones are bounded here, in requests and, optionally, in the completion tokens they may generate (``n``
x each choice's budget: its ``max_tokens`` or the server's default, which the per-request cap on ``n``
x ``max_tokens`` bounds already). Beyond a bound a request is refused at once, 429 with
``Retry-After`` (``QueueFullError``): beyond the request bound before it is parsed, beyond the token
bound once parsed, before its prompt is tokenized. Once past both it is never refused by them later.

A request takes its place when its whole body has arrived, not when it connects: a client that sends
its bodies slowly holds no place, so idle connections cannot fill the queue. While the queue is full,
a request is refused before its body is read (``check_room``).

Thread-safe: requests enter and leave on the asyncio loop; choices are admitted on the engine's
worker thread.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass

from starlette.requests import Request

from tracelearn.serving.protocol import APIError, ChatCompletionRequest, ServingLimits, parse_chat_request
from tracelearn.serving.request_io import read_body

__all__ = [
    "DEFAULT_MAX_QUEUED", "AdmissionQueue", "QueueDepth", "QueueFullError", "QueuedRequest", "admit_chat_request",
]

DEFAULT_MAX_QUEUED = 256
# What a refused client is told to wait: a queue of short requests moves within a second, and
# OpenAI's clients retry a 429 after the Retry-After they are given.
RETRY_AFTER_S = 1


class QueueFullError(APIError):
    """A request refused because the queue is at a bound: 429, OpenAI's ``rate_limit_exceeded``, with
    ``Retry-After``. ``error_type`` names the bound as OpenAI does: ``requests`` or ``tokens``."""

    def __init__(self, message: str, bound: str, retry_after_s: int) -> None:
        super().__init__(message, status_code=429, code="rate_limit_exceeded", error_type=bound)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class QueueDepth:
    """What ``/health`` reports: requests and completion tokens queued now, the bounds, and how many
    requests were refused since the server started."""

    requests: int
    tokens: int
    max_requests: int
    max_tokens: int | None
    refused: int


@dataclass
class _Place:
    """One request's share of the queue (changed under the queue's lock only)."""

    choices: int  # not yet admitted into the engine's batch
    tokens_each: int  # each of those choices' completion budget
    queued: bool = True


class AdmissionQueue:
    """Counts queued requests and their completion tokens; refuses requests beyond ``max_requests``
    or, when given, ``max_tokens``. The token bound refuses nothing while the queue holds no tokens, so
    a request that fits the per-request limit is never refused by it on an idle server.
    """

    def __init__(self, max_requests: int = DEFAULT_MAX_QUEUED, max_tokens: int | None = None,
                 retry_after_s: int = RETRY_AFTER_S) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 (or None: no token bound), got {max_tokens}")
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._requests = 0
        self._tokens = 0
        self._refused = 0

    def check_room(self) -> None:
        """Raise ``QueueFullError`` when no request could be admitted now (before reading a body)."""
        with self._lock:
            if self._requests >= self.max_requests:
                self._refused += 1
                raise self._requests_full()

    def enter(self) -> QueuedRequest:
        """Queue a request (its cost is not known until it is parsed: ``QueuedRequest.hold``), or raise
        ``QueueFullError``. The caller must ``leave`` it when the request ends (or drop it: it
        leaves when garbage collected)."""
        with self._lock:
            if self._requests >= self.max_requests:
                self._refused += 1
                raise self._requests_full()
            self._requests += 1
        return QueuedRequest(self, _Place(choices=0, tokens_each=0))

    def depth(self) -> QueueDepth:
        with self._lock:
            return QueueDepth(self._requests, self._tokens, self.max_requests, self.max_tokens, self._refused)

    def _requests_full(self) -> QueueFullError:
        return QueueFullError(
            f"This server is at capacity: {self._requests} requests are already waiting for the model, its "
            f"limit (--max-queued) is {self.max_requests}; retry after {self.retry_after_s} s.",
            bound="requests", retry_after_s=self.retry_after_s,
        )

    def _hold(self, place: _Place, choices: int, tokens_each: int) -> None:
        with self._lock:
            if not place.queued:
                return
            more = choices * tokens_each - place.choices * place.tokens_each
            others = self._tokens - place.choices * place.tokens_each
            if self.max_tokens is not None and more > 0 and others and self._tokens + more > self.max_tokens:
                self._refused += 1
                raise QueueFullError(
                    f"This server is at capacity: the requests waiting for the model may generate {others} "
                    f"tokens, and this one's {choices * tokens_each} (n x max_tokens) would exceed its limit of "
                    f"{self.max_tokens} queued tokens (--max-queued-tokens); retry after {self.retry_after_s} s, "
                    "or ask for fewer tokens.",
                    bound="tokens", retry_after_s=self.retry_after_s,
                )
            self._tokens += more
            place.choices, place.tokens_each = choices, tokens_each

    def _admitted(self, place: _Place) -> None:
        with self._lock:
            if not place.queued:
                return
            place.choices -= 1
            self._tokens -= place.tokens_each
            if place.choices == 0:
                place.queued = False
                self._requests -= 1

    def _leave(self, place: _Place) -> None:
        with self._lock:
            if place.queued:
                place.queued = False
                self._requests -= 1
                self._tokens -= place.choices * place.tokens_each


class QueuedRequest:
    """One request's place in an ``AdmissionQueue``."""

    def __init__(self, queue: AdmissionQueue, place: _Place) -> None:
        self._queue = queue
        self._place = place
        # Runs at most once: on leave(), or when the request is garbage collected (a streaming body
        # that is never iterated because its client left before the first byte).
        self._finalizer = weakref.finalize(self, queue._leave, place)
        self._finalizer.atexit = False

    def hold(self, choices: int, tokens_each: int) -> None:
        """The request's cost: ``choices`` choices of up to ``tokens_each`` completion tokens each (an
        estimate once parsed, the planned budget once tokenized). Raises ``QueueFullError`` when the
        cost grows past the token bound; lowering it never does."""
        self._queue._hold(self._place, choices, tokens_each)

    def choice_admitted(self) -> None:
        """One choice joined the engine's batch (the engine's worker thread calls this); the request
        leaves the queue when its last choice has."""
        self._queue._admitted(self._place)

    def leave(self) -> None:
        """The request ended (answered, refused or abandoned): whatever it still holds goes back. Idempotent."""
        self._finalizer()


async def admit_chat_request(
    http: Request, admission: AdmissionQueue, limits: ServingLimits
) -> tuple[ChatCompletionRequest, QueuedRequest]:
    """A chat request's body read, its place in the queue and the request parsed (on a worker thread),
    its cost held at the most it may ask for: its ``n`` x its ``max_tokens`` or the default (a larger
    ask is refused with a 400 when it is planned). Raises ``QueueFullError`` as early as the queue is
    known to be full: before the body is read, before it is parsed, before it is tokenized."""
    admission.check_room()
    body = await read_body(http, limits.max_body_bytes)
    queued = admission.enter()
    try:
        request = await asyncio.to_thread(parse_chat_request, body)
        choices = request.n or 1
        queued.hold(choices, min(request.completion_budget or limits.default_max_tokens,
                                 limits.max_request_tokens // choices or 1))
    except BaseException:
        queued.leave()
        raise
    return request, queued
