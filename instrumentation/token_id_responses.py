"""Reading token ids and logprobs out of chat-completion responses, whole or as they stream past.

``TokenIdsCapture`` accumulates what a response (or a stream's chunks) carried for choice 0, in vLLM's
shape: top-level ``prompt_token_ids``, ``choices[i].token_ids``, ``choices[i].logprobs.content``, and
the top-level ``system_fingerprint`` (which weights answered).
``ResponseReader`` feeds it from an HTTP body: one JSON chat completion, or a ``text/event-stream``
read event by event. ``tap_types`` makes the byte-stream wrappers that show a streamed response's
bytes to a reader on their way to the consumer, unchanged. Used by ``token_ids`` (the HTTP hook) and
the gateway. Every failure is reported once per kind and never raised into the agent.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from types import ModuleType
from typing import Any, Final

import orjson

from tracelearn.schemas import semconv as sc

_log = logging.getLogger(__name__)
_reported: set[str] = set()


def report_once(where: str, error: BaseException) -> None:
    """Log a hook's failure once per kind (then at debug level): the agent's call goes on."""
    if where in _reported:
        _log.debug("token-id capture: %s failed again: %r", where, error)
        return
    _reported.add(where)
    _log.warning("token-id capture: %s failed (%r); the call goes on without token ids", where, error, exc_info=error)


def guarded(where: str, hook: Callable[..., Any], *args: Any) -> None:
    try:
        hook(*args)
    except Exception as error:
        report_once(where, error)


def _field(obj: Any, name: str) -> Any:
    """A field of a parsed response (a plain dict, or a pydantic model with extra fields kept)."""
    if type(obj) is dict:  # parsed JSON: the hot path, without an ABC check
        return obj.get(name)
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


_INT_TYPES: Final = frozenset({int})
_FLOAT_TYPES: Final = frozenset({float})
_DICT_TYPES: Final = frozenset({dict})


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
    logprobs = _field(choice, "logprobs")
    content = None if logprobs is None else _field(logprobs, "content")
    values: list[Any]
    if type(content) is list and set(map(type, content)) <= _DICT_TYPES:
        values = list(map(dict.get, content, repeat("logprob")))  # parsed JSON, one entry per token: at C speed
    elif isinstance(content, Sequence) and not isinstance(content, str):
        values = [_field(entry, "logprob") for entry in content]
    else:
        return None
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
    # Which weights answered (``tracelearn serve`` puts its model version there): what lets the trainer
    # tell on-policy data from data an older version generated.
    system_fingerprint: str | None = None

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
            if isinstance(index, int) and index >= self.choice_count:
                self.choice_count = index + 1
            if index not in (0, None):
                continue
            # Both helpers return new lists: extending them is safe (and linear over a long stream).
            ids = _int_list(_field(choice, "token_ids"))
            if ids is not None:
                if self.response_token_ids is None:
                    self.response_token_ids = ids
                else:
                    self.response_token_ids.extend(ids)
            logprobs = _choice_zero_logprobs(choice)
            if logprobs is not None:
                if self.response_logprobs is None:
                    self.response_logprobs = logprobs
                else:
                    self.response_logprobs.extend(logprobs)

    def _add_top_level(self, obj: Any) -> None:
        if self.response_id is None:
            response_id = _field(obj, "id")
            if isinstance(response_id, str) and response_id:
                self.response_id = response_id
        if self.prompt_token_ids is None:
            self.prompt_token_ids = _int_list(_field(obj, "prompt_token_ids"))
        if self.system_fingerprint is None:
            fingerprint = _field(obj, "system_fingerprint")
            if isinstance(fingerprint, str) and fingerprint:
                self.system_fingerprint = fingerprint

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
        if self.system_fingerprint is not None:
            attributes[sc.OPENAI_RESPONSE_SYSTEM_FINGERPRINT] = self.system_fingerprint
        return attributes


class ResponseReader:
    """Reads choice 0's ids from one response body, whole or piece by piece, and records them once.

    A ``text/event-stream`` body is read event by event (``data:`` lines; an event ends at a blank
    line, LF or CRLF, not a lone CR; ``[DONE]`` ends the stream); any other body is one JSON chat
    completion. A piece that cannot
    be read drops what was read so far: partial ids are no ids (status ``missing_in_response``).
    """

    def __init__(self, record: Callable[[TokenIdsCapture], None], content_type: str) -> None:
        self.record = record
        self.capture = TokenIdsCapture()
        self.is_event_stream = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
        self.decompress: Callable[[bytes], bytes] | None = None
        self.pending = b""  # the end of the last piece: an SSE event not complete yet
        self.parts: list[bytes] = []  # a JSON body, piece by piece
        self.failed = False
        self.finished = False

    def expect_encoding(self, encoding: str) -> None:
        """The raw bytes of a stream are still content-encoded: gzip and deflate are undone here."""
        encoding = encoding.strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self.decompress = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32).decompress  # gzip or zlib header
        elif encoding not in ("", "identity"):
            self._fail(f"reading a {encoding}-encoded stream", ValueError(f"unsupported Content-Encoding {encoding!r}"))

    def feed(self, piece: bytes) -> None:
        if self.finished or self.failed:
            return
        try:
            if self.decompress is not None:
                piece = self.decompress(piece)
            if not self.is_event_stream:
                self.parts.append(piece)
                return
            buffer = self.pending + piece
            if b"\r" in buffer:  # CRLF line ends; a CR ending the buffer waits in `pending` for its LF
                buffer = buffer.replace(b"\r\n", b"\n")
            *events, self.pending = buffer.split(b"\n\n")
            for event in events:
                self._event(event)
        except Exception as error:
            self._fail("reading a response stream", error)

    def finish(self) -> None:
        """The body or stream ended (or said ``[DONE]``): record what was read, once."""
        if self.finished:
            return
        self.finished = True
        try:
            if self.failed:
                pass
            elif not self.is_event_stream:
                self.capture.add_response(orjson.loads(b"".join(self.parts)))
            else:
                self._event(self.pending.rstrip(b"\r\n"))  # a last event without its blank line
        except Exception as error:
            self._fail("reading a response", error)
        guarded("recording token ids", self.record, self.capture)

    def _event(self, event: bytes) -> None:
        """One SSE event: its ``data:`` lines, joined, are a chunk (other fields and comments are not ours)."""
        if event.startswith(b"data: ") and b"\n" not in event:
            data = event[6:]  # the common case: one data line
        else:
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                return
            data = b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)
        if data == b"[DONE]":
            self.finish()
        elif not self.finished:
            self.capture.add_chunk(orjson.loads(data))

    def _fail(self, where: str, error: Exception) -> None:
        report_once(where, error)
        self.failed = True
        self.capture = TokenIdsCapture(response_id=self.capture.response_id,
                                       system_fingerprint=self.capture.system_fingerprint)


class _SyncTap:
    """A response's byte stream that shows every piece to a reader on its way to the consumer.

    Mixed into the HTTP module's own ``SyncByteStream`` by ``tap_types`` (the response checks the
    type); anything else (``elapsed``...) is the wrapped stream's.
    """

    def __init__(self, inner: Any, reader: ResponseReader) -> None:
        self._inner = inner
        self._reader = reader

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._inner:
            self._reader.feed(piece)
            yield piece
        self._reader.finish()

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


class _AsyncTap:
    """``_SyncTap`` for ``AsyncByteStream``."""

    def __init__(self, inner: Any, reader: ResponseReader) -> None:
        self._inner = inner
        self._reader = reader

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._inner:
            self._reader.feed(piece)
            yield piece
        self._reader.finish()

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


def tap_types(http_module: ModuleType) -> tuple[type, type]:
    """The sync and async stream taps for an ``httpx``-like module: ``Tap(response.stream, reader)``."""
    return (
        type("TokenIdsSyncTap", (_SyncTap, http_module.SyncByteStream), {}),
        type("TokenIdsAsyncTap", (_AsyncTap, http_module.AsyncByteStream), {}),
    )
