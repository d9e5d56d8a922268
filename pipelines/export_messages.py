"""OpenAI-style chat messages (JSON text in the transitions) parsed into Arrow structs for verl's files.

Owns the message shapes of ``tracelearn.pipelines.export_verl``: :func:`parse_messages` (JSON text ->
``MESSAGE`` structs, a row that does not parse reported, not raised) and :func:`sft_messages` (the
``messages`` column of an SFT export as chat templates read it).
"""

import json
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl
import pyarrow as pa

__all__ = [
    "ARGUMENTS_AS_TEXT",
    "CHAT_MESSAGE",
    "ERROR",
    "MESSAGE",
    "PROMPT",
    "RESPONSE",
    "parse_messages",
    "sft_messages",
]

CHAT_MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
TOOL_CALL = pa.struct(
    [
        pa.field("id", pa.string()),
        pa.field("type", pa.string()),
        pa.field("function", pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.string())])),
    ]
)
MESSAGE = pa.struct(
    [
        pa.field("role", pa.string()),
        pa.field("content", pa.string()),
        pa.field("tool_calls", pa.list_(TOOL_CALL)),
        pa.field("tool_call_id", pa.string()),
        pa.field("name", pa.string()),
    ]
)
# Message fields written only when some message of the export has them.
_OPTIONAL_MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name")
ARGUMENTS_AS_TEXT = (
    "tool-call arguments stay JSON text: the export's arguments do not fit one Arrow type "
    "(different types under one key, or an empty object)"
)

_MESSAGES_DTYPE = pl.List(pl.Series(pa.array([], MESSAGE)).dtype)
_PARSED_DTYPE = pl.Struct({"messages": _MESSAGES_DTYPE, "error": pl.String})
PROMPT = "__prompt"
RESPONSE = "__response"
ERROR = "__messages_error"


def _text_content(content: Any) -> str | None:
    """OpenAI content as text: a string, or the text parts of a content-part list joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    raise ValueError(f"content is {type(content).__name__}, expected a string or a list of parts")


def _tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"a tool call is {type(call).__name__}, expected an object")
    function = call.get("function") or {}
    arguments = function.get("arguments")
    return {
        "id": call.get("id"),
        "type": call.get("type", "function"),
        # OpenAI sends arguments as JSON text; a parsed object is kept as the same text.
        "function": {
            "name": function.get("name"),
            "arguments": arguments if arguments is None or isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def _message(raw: Any, default_role: str | None) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"a message is {type(raw).__name__}, expected an object")
    role = raw.get("role", default_role)
    if not isinstance(role, str):
        raise ValueError("a message has no role")
    tool_calls = raw.get("tool_calls")
    return {
        "role": role,
        "content": _text_content(raw.get("content")),
        "tool_calls": None if tool_calls is None else [_tool_call(call) for call in tool_calls],
        "tool_call_id": raw.get("tool_call_id"),
        "name": raw.get("name"),
    }


def _parse_messages(text: str | None, default_role: str | None) -> dict[str, Any]:
    try:
        if text is None:
            raise ValueError("no messages")
        decoded = json.loads(text)
        if not isinstance(decoded, list):
            raise ValueError(f"JSON is {type(decoded).__name__}, expected a list of messages")
        return {"messages": [_message(raw, default_role) for raw in decoded], "error": None}
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return {"messages": None, "error": str(exc)}


def _messages_parser(default_role: str | None) -> Callable[[pl.Series], pl.Series]:
    # Python, not ``str.json_decode``: polars aborts the whole column on the first bad row, and a
    # bad row must be reported by its ids, not crash the export. Export is a batch step, not a hot path.
    def parse(texts: pl.Series) -> pl.Series:
        return pl.Series([_parse_messages(text, default_role) for text in texts], dtype=_PARSED_DTYPE)

    return parse


def parse_messages(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Parse the JSON messages: reads ``prompt_messages`` and ``response``; adds ``__prompt``,
    ``__response`` (lists of MESSAGE structs, response roles default to ``assistant``) and
    ``__messages_error`` (null when both parsed)."""
    prompt = pl.col("prompt_messages").map_batches(_messages_parser(None), return_dtype=_PARSED_DTYPE)
    response = pl.col("response").map_batches(_messages_parser("assistant"), return_dtype=_PARSED_DTYPE)
    return frame.with_columns(prompt.alias(PROMPT), response.alias(RESPONSE)).with_columns(
        pl.coalesce(
            pl.concat_str(pl.lit("prompt_messages: "), pl.col(PROMPT).struct.field("error")),
            pl.concat_str(pl.lit("response: "), pl.col(RESPONSE).struct.field("error")),
        ).alias(ERROR),
        pl.col(PROMPT).struct.field("messages").alias(PROMPT),
        pl.col(RESPONSE).struct.field("messages").alias(RESPONSE),
    )


def _arguments_object(arguments: Any) -> Any:
    """Tool-call arguments as the JSON value they encode (text that is not JSON stays text)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _parsed_function(function: dict[str, Any]) -> dict[str, Any]:
    return {**function, "arguments": _arguments_object(function.get("arguments"))}


def _holds_empty_struct(data_type: pa.DataType) -> bool:
    """Whether ``data_type`` nests a struct without fields (Parquet cannot store one)."""
    if pa.types.is_struct(data_type):
        return data_type.num_fields == 0 or any(_holds_empty_struct(f.type) for f in data_type)
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return _holds_empty_struct(data_type.value_type)
    return False


def sft_messages(conversations: list[list[dict[str, Any]]]) -> tuple[pa.Array, bool]:
    """The ``messages`` column as chat templates read it, and whether tool arguments stayed JSON text.

    A field of ``_OPTIONAL_MESSAGE_FIELDS`` is kept only when some message has it; tool-call arguments
    become JSON objects (one Arrow struct over the export: a key that one call lacks is null there),
    unless no single Arrow type holds them all.
    """
    present = {
        name
        for conversation in conversations
        for message in conversation
        for name in _OPTIONAL_MESSAGE_FIELDS
        if message.get(name) is not None
    }
    kept = ("role", "content", *(name for name in _OPTIONAL_MESSAGE_FIELDS if name in present))

    def shaped(message: dict[str, Any], parse_arguments: bool) -> dict[str, Any]:
        out = {name: message.get(name) for name in kept}
        calls: list[dict[str, Any]] = out.get("tool_calls") or []
        if parse_arguments and calls:
            out["tool_calls"] = [{**call, "function": _parsed_function(call["function"])} for call in calls]
        return out

    if not conversations:
        return pa.array([], pa.list_(CHAT_MESSAGE)), False
    if "tool_calls" in present:
        try:
            parsed = pa.array([[shaped(message, True) for message in conversation] for conversation in conversations])
            if not _holds_empty_struct(parsed.type):
                return parsed, False
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        return pa.array([[shaped(message, False) for message in conversation] for conversation in conversations]), True
    return pa.array([[shaped(message, False) for message in conversation] for conversation in conversations]), False
