"""The request side of the OpenAI chat-completions API (plus vLLM's ``return_token_ids``), as pydantic
models, and the OpenAI error body. Unknown fields are accepted and ignored, as OpenAI-compatible
servers do (clients send ``user``, ``metadata``, ``store``, ...); known fields are type-checked, and
values the embedded server cannot honour are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Names the weights that answered, on every response of ``tracelearn serve`` (the gateway forwards it).
MODEL_VERSION_HEADER = "x-tracelearn-model-version"


class APIError(Exception):
    """An error returned to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over the older ``max_tokens``."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Optional parameters accept an explicit null (some clients send one) and mean the OpenAI default.
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    return_token_ids: bool | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    # Accepted at their neutral values only (see ``check_supported``): the engine does not implement them.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def completion_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def check_supported(request: ChatCompletionRequest) -> None:
    """Refuse well-typed requests the server cannot honour, naming the parameter (raises ``APIError``)."""
    if request.top_logprobs and not request.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    if request.tool_choice not in (None, "none", "auto") and not request.tools:
        raise APIError("tool_choice requires tools", param="tool_choice")
    if any(not stop for stop in request.stop_strings):
        raise APIError("stop strings must not be empty", param="stop")
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(request, name):
            raise APIError(f"{name} is not supported by the embedded server", param=name)
    if request.response_format and request.response_format.get("type") != "text":
        raise APIError("only response_format {'type': 'text'} is supported by the embedded server",
                       param="response_format")
