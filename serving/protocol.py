"""The request side of the OpenAI chat-completions API (plus vLLM's ``return_token_ids``), as pydantic
models, and the OpenAI error body. Unknown fields are accepted and ignored, as OpenAI-compatible
servers do (clients send ``user``, ``metadata``, ``store``, ...); known fields are type-checked, and
values the embedded server cannot honour are refused rather than silently ignored.

Every sampling parameter is bounded to what the engine can compute (a seed must fit 64 bits; a
temperature below 1e-5 decodes greedily, see ``tracelearn.serving.sampling``), so no accepted request
can fail inside the batch it shares with other users. ``ServingLimits`` bounds what one request may
cost: its body size, its default ``max_tokens`` and the tokens its ``n`` choices may generate together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Names the weights that answered, on every response of ``tracelearn serve`` (the gateway forwards it).
MODEL_VERSION_HEADER = "x-tracelearn-model-version"

# Every seed ``torch.Generator.manual_seed`` takes; choice i of n is seeded (seed + i) mod 2**64.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# Stop strings are matched against the tail of the text after every token: bounded, so that one
# request's stop list cannot slow the decoding steps it shares with others.
MAX_STOP_STRINGS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 256, 128


@dataclass(frozen=True)
class ServingLimits:
    """What one chat request may cost the server (every bound is answered with a clear 4xx beyond it).

    ``max_body_bytes``: the request body (413 beyond). ``default_max_tokens``: the completion budget of
    a request that sets neither ``max_tokens`` nor ``max_completion_tokens`` (still capped by the
    context left). ``max_request_tokens``: ``n`` x the completion budget, the most tokens one request's
    choices may generate together (400 beyond).
    """

    max_body_bytes: int = 8 * 1024 * 1024
    default_max_tokens: int = 1024
    max_request_tokens: int = 16384

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "default_max_tokens", "max_request_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


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
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    return_token_ids: bool | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)  # vLLM's extension
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
    if any(len(stop) > MAX_STOP_CHARS for stop in request.stop_strings):
        raise APIError(f"stop strings may be at most {MAX_STOP_CHARS} characters long", param="stop")
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(request, name):
            raise APIError(f"{name} is not supported by the embedded server", param=name)
    if request.response_format and request.response_format.get("type") != "text":
        raise APIError("only response_format {'type': 'text'} is supported by the embedded server",
                       param="response_format")


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a chat-completions body; ``APIError`` (400) names the first bad parameter."""
    if not body.strip():
        raise APIError("The request has no body; send a JSON chat-completions request")
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise _validation_message(error) from None


def _validation_message(error: ValidationError) -> APIError:
    errors = error.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(f"The request body is not valid JSON: {detail}")
    if first.get("type") == "model_type" and not first.get("loc"):
        return APIError("The request body must be a JSON object (a chat-completions request)")
    # A value of a union type (``stop``: a string or a list) fails once per member; the member its
    # type matched says what is wrong with it ("at most 16 items"), not "should be a valid string".
    wrong_type = {"string_type", "list_type", "int_type", "float_type", "bool_type", "dict_type", "model_type",
                  "literal_error", "model_attributes_type"}
    param = _param_of(first)
    chosen = next((e for e in errors if _param_of(e) == param and e.get("type") not in wrong_type), first)
    message = str(chosen.get("msg", "invalid request"))
    return APIError(f"{param}: {message}" if param else message, param=param)


def _param_of(error: Any) -> str | None:
    """The parameter's dotted path (``messages.0.role``), without pydantic's union-member tags
    (``str``, ``list[str]``, ``TextPart``): request fields are lower-case identifiers or indices."""
    parts = [str(p) for p in error.get("loc", ()) if isinstance(p, int) or (str(p).isidentifier() and str(p).islower()
                                                                              and str(p) not in _TYPE_TAGS)]
    return ".".join(parts) or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
