"""Responses as the client asked for them: the token-id fields the gateway added are stripped from what
the client did not ask for, and a stream's server-sent events are read and re-rendered one at a time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tracelearn.instrumentation.token_ids import LOGPROBS, RETURN_TOKEN_IDS


@dataclass(frozen=True)
class ClientAsked:
    token_ids: bool
    logprobs: bool

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ClientAsked:
        return cls(token_ids=bool(body.get(RETURN_TOKEN_IDS)), logprobs=bool(body.get(LOGPROBS)))

    def strip(self, body: dict[str, Any], streamed: bool) -> bool:
        """Remove from a response (or a chunk) what the client did not ask for; False: drop the chunk.

        A chunk that carried only what was stripped (a delta's token ids or logprobs) is dropped, as
        the upstream would not have sent it to this client.
        """
        if not self.token_ids:
            body.pop("prompt_token_ids", None)
        choices = body.get("choices")
        if not isinstance(choices, list):
            return True
        carried_only_extras = bool(choices)
        for choice in choices:
            if not isinstance(choice, dict):
                carried_only_extras = False
                continue
            if not self.token_ids:
                choice.pop("token_ids", None)
            if not self.logprobs and "logprobs" in choice:
                choice["logprobs"] = None
            kept = choice.get("delta") or choice.get("finish_reason") is not None or choice.get("logprobs")
            if not streamed or kept or choice.get("token_ids") is not None:
                carried_only_extras = False
        visible = {key for key in body if key not in ("id", "object", "created", "model", "choices",
                                                         "system_fingerprint", "usage")}
        if body.get("usage") is not None or visible:
            carried_only_extras = False
        return not (streamed and carried_only_extras)


@dataclass
class SSEEvent:
    lines: list[str]
    payload: dict[str, Any] | None  # the JSON of a single ``data:`` line, when it is one

    def render(self, asked: ClientAsked) -> str | None:
        """The event as the client should see it (``None``: nothing left to send)."""
        if self.payload is None:
            return "\n".join(self.lines) + "\n\n"
        if not asked.strip(self.payload, streamed=True):
            return None
        others = [line for line in self.lines if not line.startswith("data:")]
        return "".join(f"{line}\n" for line in others) + f"data: {json.dumps(self.payload, ensure_ascii=False)}\n\n"


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """Server-sent events of a response, one at a time as they arrive (a blank line ends an event)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line:
            lines.append(line)
            continue
        if lines:
            yield parse_event(lines)
            lines = []
    if lines:
        yield parse_event(lines)


def parse_event(lines: list[str]) -> SSEEvent:
    data = [line for line in lines if line.startswith("data:")]
    if len(data) != 1:
        return SSEEvent(lines, None)
    text = data[0][len("data:"):].strip()
    if text == "[DONE]":
        return SSEEvent(lines, None)
    try:
        payload = json.loads(text)
    except ValueError:
        return SSEEvent(lines, None)
    return SSEEvent(lines, payload if isinstance(payload, dict) else None)
