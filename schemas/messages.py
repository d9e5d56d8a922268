"""The message codec: the JSON format of the spans table's ``input_messages`` / ``output_messages``
columns, and its conversion to and from every convention's message encoding.

The column format is OpenAI chat messages as compact JSON text::

    [{"role": "system" | "user" | "assistant" | "tool" | ..., "content": str | None,
      "tool_calls"?: [{"id", "type": "function", "function": {"name", "arguments": JSON text}}],
      "tool_call_id"?: str, "reasoning_content"?: str}]

``content`` is text only (media parts are not carried); ``reasoning_content`` holds reasoning the
model emitted apart from its answer (vLLM's field name). Readers, one per encoding:

* GenAI parts messages (``gen_ai.input.messages`` / ``gen_ai.output.messages`` /
  ``gen_ai.system_instructions``; Traceloop 0.55+, the official GenAI instrumentations, Pydantic AI):
  ``[{"role", "parts": [{"type": "text" | "reasoning" | "tool_call" | "tool_call_response", ...}]}]``;
* Traceloop before 0.55, flattened attributes: ``gen_ai.prompt.{i}.role`` / ``.content`` /
  ``.tool_calls.{j}.name`` ...;
* OpenInference, flattened attributes: ``llm.input_messages.{i}.message.role`` / ``.content`` /
  ``.contents.{k}.message_content.text`` / ``.tool_calls.{j}.tool_call.function.name`` / ``.tool_call_id``;
* GenAI events (semantic conventions 1.28-1.36: ``gen_ai.{system,user,assistant,tool}.message`` and
  ``gen_ai.choice`` with their bodies; 1.26: ``gen_ai.content.prompt`` / ``gen_ai.content.completion``),
  as span events, log records or Pydantic AI's ``events`` attribute.

And one writer, OpenAI chat messages to GenAI parts messages (what the gateway records).

Every function is pure and tolerant: malformed input never raises. A reader returns ``Decoded``:
the messages it could read (``None`` when the encoding is absent) and a short, countable description
of what it could not read (``None`` when everything was read), because a call still lands with the
messages that could be read and the problem is counted, never the export or the build failed.
This module may import the standard library and orjson only.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeGuard

import orjson

Message = dict[str, Any]

# Compact JSON without ASCII escaping; orjson does it about 10x faster than the json module on the
# capture hot path (message normalization), json remains the fallback for what orjson refuses
# (integers beyond 64 bits, non-string keys).
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_DECODER = json.JSONDecoder()


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text (non-finite floats inside containers become ``null``); a value
    JSON cannot represent at all (too deeply nested) becomes a JSON string saying so."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # integers beyond 64 bits, non-string keys, nesting beyond orjson's limit
        pass
    try:
        return _COMPACT_JSON.encode(value)
    except (TypeError, ValueError, RecursionError):
        return _COMPACT_JSON.encode(f"<{type(value).__name__} not representable as JSON>")


def parse_json(text: str) -> Any:
    """Parse JSON text; raises ``ValueError`` when it is not JSON."""
    return orjson.loads(text)


class Decoded(NamedTuple):
    """What a reader made of one encoding: the messages (``None``: absent) and what it could not read."""

    messages: list[Message] | None
    problem: str | None = None


ABSENT = Decoded(None)
# Problem descriptions are few and fixed, so a column of them can be counted.
NOT_JSON = "not JSON"
TRUNCATED_JSON = "truncated JSON"
NOT_A_LIST = "not a list of messages"
BAD_MESSAGE = "unreadable message"
BAD_PART = "unreadable part"

# A tuple, not a set: ``in`` compares with ==, so a kind that is a list (unhashable) is no error.
REASONING_PARTS = ("reasoning", "reasoning_text", "thinking")
# Roles as the model saw them: smolagents' own roles are sent as these (its tool_role_conversions),
# LangChain and Gemini name the two sides differently.
ROLE_ALIASES = {
    "tool-call": "assistant",
    "tool-response": "user",
    "human": "user",
    "ai": "assistant",
    "model": "assistant",
}


def _role(value: Any, default: str) -> str:
    if type(value) is str and value:
        return ROLE_ALIASES.get(value, value)
    return default


def _is_mapping(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, answering the common case (parsed JSON: a dict) without the ABC check."""
    return type(value) is dict or isinstance(value, Mapping)


def _text(value: Any) -> str:
    """A part's content or a tool result as text: strings as-is, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return compact_json(value)


def tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    """One tool call in the column's (OpenAI's) shape; arguments as the JSON text the API carries
    (instrumentations may have parsed them into objects)."""
    if type(arguments) is not str:
        arguments = compact_json({} if arguments is None else arguments)
    if call_id is not None and type(call_id) is not str:
        call_id = str(call_id)
    if name is not None and type(name) is not str:
        name = str(name)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _loads_salvaging(text: str) -> tuple[Any, str | None]:
    """``text`` parsed; a JSON array cut short (an instrumentation's or our own size limit) yields its
    complete leading elements and ``TRUNCATED_JSON``; anything else unparsable yields ``NOT_JSON``."""
    try:
        return orjson.loads(text), None
    except ValueError:
        pass
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return None, NOT_JSON
    items: list[Any] = []
    position = len(text) - len(stripped) + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            item, position = _DECODER.raw_decode(text, position)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            break
        items.append(item)
    return (items, TRUNCATED_JSON) if items else (None, NOT_JSON)


def _first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


# --- GenAI parts messages -> column ----------------------------------------------------------------


def parts_message_to_openai(message: Mapping[str, Any]) -> tuple[list[Message], str | None]:
    """One GenAI parts message as one or more OpenAI chat messages, and what could not be read.

    Each ``tool_call_response`` part becomes a ``tool`` message of its own, as the OpenAI API
    represents it, in the order the parts come (Pydantic AI sends tool results as parts of a ``user``
    message, its result under ``result``, not ``response``); the message's other text stays in a
    message of its role. One pass over the parts: this runs for every message of every captured call.
    """
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if type(role) is str and role else "user"
    parts = message.get("parts")
    if type(parts) is not list:
        # A message without parts (some writers put OpenAI-style content here): read what is there.
        content = message.get("content")
        out: Message = {"role": role, "content": content if isinstance(content, str) else None}
        if role == "tool" and isinstance(message.get("tool_call_id"), str):
            out["tool_call_id"] = message["tool_call_id"]
        readable = parts is None and (content is None or isinstance(content, str))
        return [out], None if readable else BAD_MESSAGE
    # Kinds are compared with == only (a kind may be a list, which a set look-up cannot hash), the
    # lists are made when needed: this loop runs for every part of every message of every call.
    messages: list[Message] | None = None
    texts: list[str] = []
    reasoning: list[str] | None = None
    calls: list[dict[str, Any]] | None = None
    problem = None
    for part in parts:
        if type(part) is not dict and not isinstance(part, Mapping):
            problem = BAD_PART
            continue
        kind = part.get("type")
        if kind == "text" or kind is None or kind == "refusal":
            content = part.get("content")
            texts.append(content if type(content) is str else _text(content))
        elif kind == "tool_call":
            if calls is None:
                calls = []
            calls.append(tool_call(part.get("id"), part.get("name"), part.get("arguments")))
        elif kind == "tool_call_response":
            if messages is None:
                messages = []
            if texts or calls or reasoning:
                messages.append(_assembled(role, texts, calls, reasoning))
                texts, calls, reasoning = [], None, None
            result = part["response"] if "response" in part else part.get("result")
            messages.append({"role": "tool", "tool_call_id": part.get("id"), "content": _text(result)})
        elif kind in REASONING_PARTS:
            if reasoning is None:
                reasoning = []
            reasoning.append(_text(part.get("content")))
        elif type(kind) is not str:
            problem = BAD_PART
        # Media (uri, blob, file) and provider-specific parts carry no text: the column holds text only.
    if messages is None:  # the common case, built here: one message of text and tool calls
        out = {"role": role, "content": "".join(texts) if texts else None}
        if calls:
            out["tool_calls"] = calls
        if reasoning:
            out["reasoning_content"] = "".join(reasoning)
        return [out], problem
    if texts or calls or reasoning:
        messages.append(_assembled(role, texts, calls, reasoning))
    return messages, problem


def _assembled(role: str, texts: list[str], calls: list[dict[str, Any]] | None, reasoning: list[str] | None) -> Message:
    out: Message = {"role": role, "content": "".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    return out


def parts_messages_to_openai(value: Any) -> Decoded:
    """GenAI parts messages (JSON text, or already parsed as log records carry them) as OpenAI messages."""
    if value is None:
        return ABSENT
    problem = None
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except ValueError:
            value, problem = _loads_salvaging(value)
            if value is None:
                return Decoded(None, problem)
    if type(value) is not list:
        if _is_mapping(value):
            value = [value]  # one message where a list was expected
        elif not isinstance(value, tuple):
            return Decoded(None, NOT_A_LIST)
    out: list[Message] = []
    for message in value:
        if type(message) is dict or isinstance(message, Mapping):
            converted, part_problem = parts_message_to_openai(message)
            out += converted
            if problem is None:
                problem = part_problem
        elif problem is None:
            problem = BAD_MESSAGE
    return Decoded(out, problem)


def system_instructions_to_openai(value: Any) -> Decoded:
    """``gen_ai.system_instructions`` (a list of parts as JSON text, or plain text) as one system message."""
    if value is None:
        return ABSENT
    if isinstance(value, str):
        parsed, problem = _loads_salvaging(value)
        if parsed is None:  # plain text instructions
            return Decoded([{"role": "system", "content": value}])
        value = parsed
    else:
        problem = None
    if isinstance(value, str):
        return Decoded([{"role": "system", "content": value}], problem)
    if not isinstance(value, list | tuple):
        return Decoded(None, NOT_A_LIST)
    messages, part_problem = parts_message_to_openai({"role": "system", "parts": list(value)})
    return Decoded(messages, problem or part_problem)


# --- Column (OpenAI chat messages) -> GenAI parts messages -------------------------------------------


def _content_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                parts.append({"type": "text", "content": part})
            elif _is_mapping(part) and part.get("type") == "text":
                parts.append({"type": "text", "content": _text(part.get("text", ""))})
            elif _is_mapping(part):
                parts.append({"type": str(part.get("type", "unknown"))})  # images etc.: kind only
    return parts


def openai_message_to_parts(message: Mapping[str, Any]) -> dict[str, Any]:
    """One OpenAI chat message as a GenAI parts message (``{"role", "parts"}``)."""
    role = message.get("role")
    role = role if isinstance(role, str) and role else "user"
    if role == "tool":
        parts: list[dict[str, Any]] = [
            {"type": "tool_call_response", "id": message.get("tool_call_id"), "response": message.get("content")}
        ]
        return {"role": role, "parts": parts}
    parts = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        parts.append({"type": "reasoning", "content": reasoning})
    parts += _content_parts(message.get("content"))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list | tuple) else ():
        if not _is_mapping(call):
            continue
        function = call.get("function")
        function = function if _is_mapping(function) else {}
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": function.get("name"),
                "arguments": function.get("arguments"),
            }
        )
    return {"role": role, "parts": parts}


def openai_messages_to_parts(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages (anything else: none) as GenAI parts messages; non-objects are skipped."""
    if not isinstance(messages, list | tuple):
        return []
    return [openai_message_to_parts(message) for message in messages if _is_mapping(message)]


# --- Flattened attributes ---------------------------------------------------------------------------


def _indexed(attributes: Mapping[str, Any], prefix: str) -> dict[int, dict[str, Any]]:
    """``{prefix}{i}.{field}`` attributes grouped by ``i``: ``{i: {field: value}}``."""
    by_index: dict[int, dict[str, Any]] = {}
    for key, value in attributes.items():
        if not key.startswith(prefix):
            continue
        index_text, _, field = key[len(prefix) :].partition(".")
        if index_text.isdigit() and field:
            by_index.setdefault(int(index_text), {})[field] = value
    return by_index


def _indexed_fields(fields: Mapping[str, Any], prefix: str) -> list[dict[str, Any]]:
    """Within one message's fields, ``{prefix}{j}.{rest}`` grouped by ``j`` in numeric order."""
    grouped = _indexed(fields, prefix)
    return [grouped[j] for j in sorted(grouped)]


def flattened_messages_to_openai(attributes: Mapping[str, Any], prefix: str) -> Decoded:
    """Traceloop's pre-0.55 ``{prefix}{i}.role`` / ``.content`` / ``.tool_calls.{j}.*`` as messages."""
    by_index = _indexed(attributes, prefix)
    if not by_index:
        return ABSENT
    messages = []
    for index in sorted(by_index):
        fields = by_index[index]
        message: Message = {"role": _role(fields.get("role"), "assistant")}
        content = fields.get("content")
        message["content"] = content if isinstance(content, str) or content is None else _text(content)
        if "tool_call_id" in fields:
            message["tool_call_id"] = fields["tool_call_id"]
        calls = _indexed_fields(fields, "tool_calls.")
        if calls:
            message["tool_calls"] = [tool_call(c.get("id"), c.get("name"), c.get("arguments", "")) for c in calls]
        messages.append(message)
    return Decoded(messages)


def openinference_messages_to_openai(attributes: Mapping[str, Any], prefix: str) -> Decoded:
    """OpenInference's ``{prefix}{i}.message.*`` (``llm.input_messages.`` / ``llm.output_messages.``)."""
    by_index = _indexed(attributes, prefix)
    if not by_index:
        return ABSENT
    messages = []
    problem = None
    for index in sorted(by_index):
        fields = by_index[index]
        message: Message = {"role": _role(fields.get("message.role"), "user")}
        content = fields.get("message.content")
        if content is None:
            texts: list[str] = []
            reasoning: list[str] = []
            for item in _indexed_fields(fields, "message.contents."):
                kind = item.get("message_content.type", "text")
                text = item.get("message_content.text")
                if text is None:
                    continue  # images, audio: the column holds text only
                (reasoning if kind == "reasoning" else texts).append(_text(text))
            message["content"] = "".join(texts) if texts else None
            if reasoning:
                message["reasoning_content"] = "".join(reasoning)
        else:
            message["content"] = content if isinstance(content, str) else _text(content)
        if "message.tool_call_id" in fields:
            message["tool_call_id"] = _text(fields["message.tool_call_id"])
        calls = [
            tool_call(
                call.get("tool_call.id"),
                call.get("tool_call.function.name"),
                call.get("tool_call.function.arguments", ""),
            )
            for call in _indexed_fields(fields, "message.tool_calls.")
        ]
        legacy_name = fields.get("message.function_call_name")
        if legacy_name is not None:  # the pre-tools function_call API
            calls.append(tool_call(None, legacy_name, fields.get("message.function_call_arguments_json", "")))
        if calls:
            message["tool_calls"] = calls
        if "message.role" not in fields and content is None and not calls:
            problem = BAD_MESSAGE
        messages.append(message)
    return Decoded(messages, problem)


# --- GenAI events -----------------------------------------------------------------------------------

# Event names of the semantic conventions' message events and the role each carries.
MESSAGE_EVENT_ROLES = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}
CHOICE_EVENT = "gen_ai.choice"
PROMPT_EVENT = "gen_ai.content.prompt"  # conventions 1.26: attribute gen_ai.prompt, JSON messages
COMPLETION_EVENT = "gen_ai.content.completion"  # attribute gen_ai.completion
EVENT_NAME_KEY = "event.name"


def _maybe_json(value: Any) -> Any:
    """Nested body fields arrive as JSON text on span events (attributes are flat): parse those."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except ValueError:
            return value
    return value


def _event_content(value: Any) -> tuple[str | None, str | None]:
    """An event body's ``content`` as (text, reasoning): a string, or a list of strings / text items
    (``{"type": "text", "text"}``, Pydantic AI's ``{"kind": "text", "text"}``, ``{"text"}``)."""
    value = _maybe_json(value)
    if value is None or isinstance(value, str):
        return value, None
    if not isinstance(value, list | tuple):
        return _text(value), None
    texts: list[str] = []
    reasoning: list[str] = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif _is_mapping(item) and isinstance(item.get("text"), str):
            kind = item.get("type", item.get("kind"))
            (reasoning if isinstance(kind, str) and kind in REASONING_PARTS else texts).append(item["text"])
    return ("".join(texts) if texts else None), ("".join(reasoning) if reasoning else None)


def _openai_tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call in OpenAI's shape, as event bodies carry it (arguments may be an object)."""
    function = call.get("function")
    if not _is_mapping(function):
        return tool_call(call.get("id"), None, None)
    return tool_call(call.get("id"), function.get("name"), function.get("arguments"))


def _event_message(role: str, body: Mapping[str, Any]) -> Message:
    text, reasoning = _event_content(body.get("content"))
    message: Message = {"role": _role(body.get("role"), role), "content": text}
    if role == "tool":
        message["tool_call_id"] = body.get("id")
    calls = _maybe_json(body.get("tool_calls"))
    if isinstance(calls, list | tuple) and calls:
        message["tool_calls"] = [_openai_tool_call(c) for c in calls if _is_mapping(c)]
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def _event_bodies(value: Any) -> tuple[list[tuple[str, Mapping[str, Any]]], str | None]:
    """Pydantic AI's ``events`` span attribute (JSON list of ``{"event.name", **body}``) as (name, body)."""
    parsed, problem = _loads_salvaging(value) if isinstance(value, str) else (value, None)
    if not isinstance(parsed, list | tuple):
        return [], problem or NOT_A_LIST
    pairs = [(str(e.get(EVENT_NAME_KEY)), e) for e in parsed if _is_mapping(e)]
    return pairs, problem


def event_messages_to_openai(events: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[Decoded, Decoded]:
    """GenAI message events (name, body) as (input messages, output messages).

    Message events make the input in their order; ``gen_ai.choice`` events the output, by ``index``.
    A body's nested fields may be JSON text (span events) or structures (log records). Events of
    other names are not messages and are passed over.
    """
    inputs: list[Message] | None = None
    choices: list[tuple[int, Message]] | None = None
    input_problem = output_problem = None
    for name, body in events:
        role = MESSAGE_EVENT_ROLES.get(name)
        if role is None and name not in (CHOICE_EVENT, PROMPT_EVENT, COMPLETION_EVENT):
            continue
        is_output = name in (CHOICE_EVENT, COMPLETION_EVENT)
        if is_output and choices is None:
            choices = []
        elif not is_output and inputs is None:
            inputs = []
        if not _is_mapping(body):
            if is_output:
                output_problem = BAD_MESSAGE
            else:
                input_problem = BAD_MESSAGE
            continue
        if role is not None and inputs is not None:
            inputs.append(_event_message(role, body))
        elif name == CHOICE_EVENT and choices is not None:
            message = _maybe_json(body.get("message"))
            index = body.get("index")
            position = index if isinstance(index, int) and not isinstance(index, bool) else len(choices)
            choices.append((position, _event_message("assistant", message if _is_mapping(message) else {})))
        elif name == PROMPT_EVENT and inputs is not None:
            decoded = _content_event(body, "gen_ai.prompt", "gen_ai.input.messages", "user")
            inputs += decoded.messages or []
            input_problem = input_problem or decoded.problem
        elif name == COMPLETION_EVENT and choices is not None:
            decoded = _content_event(body, "gen_ai.completion", "gen_ai.output.messages", "assistant")
            choices += [(len(choices), message) for message in decoded.messages or []]
            output_problem = output_problem or decoded.problem
    output = None if choices is None else [message for _, message in sorted(choices, key=lambda pair: pair[0])]
    return Decoded(inputs, input_problem), Decoded(output, output_problem)


def _content_event(body: Mapping[str, Any], legacy_key: str, parts_key: str, role: str) -> Decoded:
    """A ``gen_ai.content.prompt`` / ``.completion`` event: conventions 1.26 put JSON ``[{"role",
    "content"}]`` or text under ``gen_ai.prompt`` / ``gen_ai.completion``; OpenLIT puts the messages
    under ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (as Python's ``str`` of a list for
    some providers, which is not JSON and is counted as such)."""
    if parts_key in body:
        return parts_messages_to_openai(body[parts_key])
    value = body.get(legacy_key)
    if value is None:
        return ABSENT
    parsed = _maybe_json(value)
    if isinstance(parsed, str):
        return Decoded([{"role": role, "content": parsed}])
    if not isinstance(parsed, list | tuple):
        return Decoded(None, NOT_A_LIST)
    messages = []
    problem = None
    for item in parsed:
        if _is_mapping(item):
            messages.append(_event_message(_role(item.get("role"), role), item))
        else:
            problem = BAD_MESSAGE
    return Decoded(messages, problem)


def events_attribute_to_openai(value: Any) -> tuple[Decoded, Decoded]:
    """Pydantic AI's ``events`` span attribute (its event mode ``attributes``) as (input, output)."""
    pairs, problem = _event_bodies(value)
    inputs, outputs = event_messages_to_openai(pairs)
    if problem is not None:
        inputs = Decoded(inputs.messages, _first_problem(inputs.problem, problem))
    return inputs, outputs
