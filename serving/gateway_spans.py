"""What the gateway records of a call: the LLM span's attributes from a response or the events of a
stream (messages as GenAI parts JSON, usage, finish reasons, token ids, the model version), and how a
failed call's span ends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from tracelearn.instrumentation.token_ids import TokenIdsCapture
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.messages import compact_json, openai_message_to_parts, openai_messages_to_parts
from tracelearn.serving.gateway_upstream import UpstreamError

# OpenTelemetry's general HTTP / error attribute names, set on the gateway's spans.
HTTP_STATUS: Final = "http.response.status_code"
ERROR_TYPE: Final = "error.type"


def input_messages_json(messages: Any) -> str:
    """OpenAI chat messages as GenAI ``gen_ai.input.messages`` JSON (role + parts)."""
    return compact_json(openai_messages_to_parts(messages))


@dataclass
class ChoiceOutput:
    content: str = ""
    has_content: bool = False
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def add_message(self, message: Mapping[str, Any]) -> None:
        if isinstance(message.get("content"), str):
            self.content += message["content"]
            self.has_content = True
        for index, call in enumerate(message.get("tool_calls") or ()):
            if isinstance(call, dict):
                self.tool_calls[index] = call

    def add_delta(self, delta: Mapping[str, Any]) -> None:
        if isinstance(delta.get("content"), str):
            self.content += delta["content"]
            self.has_content = self.has_content or bool(delta["content"])
        for piece in delta.get("tool_calls") or ():
            if not isinstance(piece, dict):
                continue
            empty = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            call = self.tool_calls.setdefault(int(piece.get("index", len(self.tool_calls))), empty)
            if piece.get("id"):
                call["id"] = piece["id"]
            function = piece.get("function") or {}
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]

    def message(self) -> dict[str, Any]:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        out = openai_message_to_parts(
            {"role": "assistant", "content": self.content if self.has_content else None, "tool_calls": calls}
        )
        if self.finish_reason is not None:
            out["finish_reason"] = self.finish_reason
        return out


@dataclass
class ResponseRecord:
    """What the span learns from a response (or the events of a stream)."""

    asked_token_ids: bool
    capture: TokenIdsCapture = field(default_factory=TokenIdsCapture)
    choices: dict[int, ChoiceOutput] = field(default_factory=dict)
    model: str | None = None
    fingerprint: str | None = None
    usage: Mapping[str, Any] | None = None
    error: str | None = None

    def _top(self, body: Mapping[str, Any]) -> None:
        if self.model is None and isinstance(body.get("model"), str):
            self.model = body["model"]
        if self.fingerprint is None and isinstance(body.get("system_fingerprint"), str):
            self.fingerprint = body["system_fingerprint"]
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]
        if isinstance(body.get("error"), dict):
            self.error = str(body["error"].get("message") or body["error"])

    def add_response(self, body: Mapping[str, Any]) -> None:
        self._top(body)
        self.capture.add_response(body)
        for choice in body.get("choices") or ():
            if isinstance(choice, dict):
                output = self.choices.setdefault(int(choice.get("index") or 0), ChoiceOutput())
                output.add_message(choice.get("message") or {})
                output.finish_reason = choice.get("finish_reason")

    def add_chunk(self, chunk: Mapping[str, Any]) -> None:
        self._top(chunk)
        self.capture.add_chunk(chunk)
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                output = self.choices.setdefault(int(choice.get("index") or 0), ChoiceOutput())
                output.add_delta(choice.get("delta") or {})
                if choice.get("finish_reason") is not None:
                    output.finish_reason = choice["finish_reason"]

    def attributes(self, status_when_not_asked: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        if self.model is not None:
            attributes[sc.GEN_AI_RESPONSE_MODEL] = self.model
        if self.choices:
            outputs = [self.choices[i] for i in sorted(self.choices)]
            attributes[sc.GEN_AI_OUTPUT_MESSAGES] = compact_json([o.message() for o in outputs])
            reasons = [o.finish_reason for o in outputs if o.finish_reason is not None]
            if reasons:
                attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
        if self.usage is not None:
            for key, name in (("prompt_tokens", sc.GEN_AI_USAGE_INPUT_TOKENS),
                              ("completion_tokens", sc.GEN_AI_USAGE_OUTPUT_TOKENS)):
                if isinstance(self.usage.get(key), int):
                    attributes[name] = self.usage[key]
        if self.asked_token_ids:
            attributes.update(self.capture.attributes())
        else:
            if self.capture.response_id is not None:
                attributes[sc.GEN_AI_RESPONSE_ID] = self.capture.response_id
            attributes[sc.TOKEN_IDS_STATUS] = status_when_not_asked
        return attributes

    def model_version(self, header: str | None, requested_model: Any) -> str:
        for candidate in (header, self.fingerprint, self.model, requested_model):
            if isinstance(candidate, str) and candidate:
                return candidate
        return "unknown"


def end_with_error(span: trace.Span, error: BaseException) -> None:
    if span.is_recording():
        span.set_attribute(ERROR_TYPE, type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


def end_with_upstream_error(span: trace.Span, error: UpstreamError) -> None:
    span.set_attributes({ERROR_TYPE: error.code, HTTP_STATUS: error.status})
    span.set_status(Status(StatusCode.ERROR, error.message))
    span.end()


def end_failed(span: trace.Span, status: int, content: bytes) -> None:
    try:
        message = str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = content[:500].decode("utf-8", errors="replace")
    span.set_attributes({ERROR_TYPE: str(status), sc.TOKEN_IDS_STATUS: sc.TOKEN_IDS_MISSING})
    span.set_status(Status(StatusCode.ERROR, f"upstream answered HTTP {status}: {message}"))
    span.end()
