"""Normalization of what instrumentations emit into the spans table's promoted columns.

Three message encodings are read and turned into one: OpenAI chat messages as JSON text
(``[{"role", "content", "tool_calls"?, "tool_call_id"?}]``):

* GenAI conventions with parts (Traceloop 0.55+, official openai-v2 with content capture):
  ``gen_ai.input.messages`` / ``gen_ai.output.messages`` = ``[{"role", "parts": [{"type": ...}]}]``;
* Traceloop before 0.55, flattened: ``gen_ai.prompt.{i}.role`` / ``.content`` /
  ``.tool_calls.{j}.name`` ..., and ``gen_ai.completion.{i}.*``;
* our own ``tracelearn.message`` spans (role and content attributes).

Every function here is pure and tolerant: malformed input yields ``None`` rather than an exception,
because a span is never rejected for having odd attributes (the raw attributes are kept anyway).
"""

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from tracelearn.schemas import semconv as sc

LLM_OPERATIONS = frozenset({"chat", "text_completion", "completion", "generate_content", "embeddings"})
AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent"})


# Compact JSON without ASCII escaping; orjson does it about 10x faster than the json module on the
# capture hot path (message normalization), json remains the fallback for what orjson refuses
# (integers beyond 64 bits, non-string keys).
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text (non-finite floats inside containers become ``null``)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _COMPACT_JSON.encode(value)


def parse_json(text: str) -> Any:
    """Parse JSON text; raises ``ValueError`` when it is not JSON."""
    return orjson.loads(text)


def _is_mapping(value: Any) -> bool:
    """``isinstance(value, Mapping)``, answering the common case (parsed JSON: a dict) without the ABC check."""
    return type(value) is dict or isinstance(value, Mapping)


def attribute_text(value: Any) -> str:
    """An attribute value as the text stored in the spans table: strings as-is, the rest as JSON."""
    if isinstance(value, str):
        return value
    # Exact scalar types next, written as the JSON encoder writes them: this runs for every
    # attribute of every captured span.
    kind = type(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    try:
        return compact_json(value)
    except (TypeError, ValueError):
        return str(value)


def _arguments_text(arguments: Any) -> str:
    """Tool-call arguments as the JSON text the OpenAI API carries (instrumentations may parse them)."""
    return arguments if isinstance(arguments, str) else compact_json(arguments)


TEXT_PART_TYPES = frozenset({"text", "reasoning_text"})


def parts_message_to_openai(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One GenAI-conventions message (with ``parts``) as one or more OpenAI chat messages.

    A message holding several ``tool_call_response`` parts becomes one ``tool`` message per part,
    as the OpenAI API represents it. One pass over the parts: this runs for every message of every
    captured LLM call.
    """
    role = str(message.get("role", "user"))
    parts = message.get("parts")
    if not isinstance(parts, list):
        content = message.get("content")
        return [{"role": role, "content": content if isinstance(content, str) else None}]
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    responses: list[dict[str, Any]] = []
    for part in parts:
        if not _is_mapping(part):
            continue
        kind = part.get("type")
        if kind in TEXT_PART_TYPES or kind is None:
            texts.append(str(part.get("content", "")))
        elif kind == "tool_call":
            tool_calls.append(
                {
                    "id": part.get("id"),
                    "type": "function",
                    "function": {
                        "name": part.get("name"),
                        "arguments": _arguments_text(part.get("arguments", {})),
                    },
                }
            )
        elif kind == "tool_call_response":
            responses.append(
                {"role": "tool", "tool_call_id": part.get("id"), "content": attribute_text(part.get("response"))}
            )
    if responses:
        return responses
    out: dict[str, Any] = {"role": role, "content": "".join(texts) if texts else None}
    if tool_calls:
        out["tool_calls"] = tool_calls
    return [out]


def parts_messages_to_openai(text: str) -> list[dict[str, Any]] | None:
    """``gen_ai.input.messages`` / ``gen_ai.output.messages`` JSON text as OpenAI chat messages."""
    try:
        messages = parse_json(text)
    except (TypeError, ValueError):
        return None
    if not isinstance(messages, list):
        return None
    out: list[dict[str, Any]] = []
    for message in messages:
        if _is_mapping(message):
            out.extend(parts_message_to_openai(message))
    return out


def flattened_messages_to_openai(attributes: Mapping[str, Any], prefix: str) -> list[dict[str, Any]] | None:
    """Traceloop's pre-0.55 ``{prefix}{i}.role`` / ``.content`` / ``.tool_calls.{j}.*`` as messages."""
    by_index: dict[int, dict[str, Any]] = {}
    for key, value in attributes.items():
        if not key.startswith(prefix):
            continue
        index_text, _, field = key[len(prefix) :].partition(".")
        if not index_text.isdigit() or not field:
            continue
        by_index.setdefault(int(index_text), {})[field] = value
    if not by_index:
        return None
    messages = []
    for index in sorted(by_index):
        fields = by_index[index]
        message: dict[str, Any] = {"role": str(fields.get("role", "assistant"))}
        content = fields.get("content")
        message["content"] = content if isinstance(content, str) or content is None else attribute_text(content)
        if "tool_call_id" in fields:
            message["tool_call_id"] = fields["tool_call_id"]
        calls: dict[int, dict[str, Any]] = {}
        for field, value in fields.items():
            if field.startswith("tool_calls."):
                call_index, _, call_field = field[len("tool_calls.") :].partition(".")
                if call_index.isdigit():
                    calls.setdefault(int(call_index), {})[call_field] = value
        if calls:
            message["tool_calls"] = [
                {
                    "id": calls[i].get("id"),
                    "type": "function",
                    "function": {
                        "name": calls[i].get("name"),
                        "arguments": _arguments_text(calls[i].get("arguments", "")),
                    },
                }
                for i in sorted(calls)
            ]
        messages.append(message)
    return messages


def messages_json(messages: list[dict[str, Any]] | None) -> str | None:
    """Normalized messages as compact JSON text (``None`` stays ``None``)."""
    if messages is None:
        return None
    return compact_json(messages)


def input_messages(attributes: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The prompt messages of an LLM span, whichever encoding the instrumentation used."""
    raw = attributes.get(sc.GEN_AI_INPUT_MESSAGES)
    if isinstance(raw, str):
        messages = parts_messages_to_openai(raw)
        system = attributes.get(sc.GEN_AI_SYSTEM_INSTRUCTIONS)
        if messages is not None and isinstance(system, str):
            # Newer conventions keep the system prompt apart from the messages.
            instructions = parts_messages_to_openai(f'[{{"role":"system","parts":{system}}}]')
            messages = (instructions or []) + messages
        return messages
    return flattened_messages_to_openai(attributes, sc.GEN_AI_PROMPT_PREFIX)


def output_messages(attributes: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The response messages of an LLM span, whichever encoding the instrumentation used."""
    raw = attributes.get(sc.GEN_AI_OUTPUT_MESSAGES)
    if isinstance(raw, str):
        return parts_messages_to_openai(raw)
    return flattened_messages_to_openai(attributes, sc.GEN_AI_COMPLETION_PREFIX)


def span_type(name: str, attributes: Mapping[str, Any]) -> str:
    """Classify a span as llm, tool, agent, reward, annotation, message, rollout, token_ids or other."""
    declared = attributes.get(sc.SPAN_TYPE)
    if isinstance(declared, str):
        return declared
    operation = attributes.get(sc.GEN_AI_OPERATION_NAME)
    traceloop_kind = attributes.get(sc.TRACELOOP_SPAN_KIND)
    if operation == "execute_tool" or traceloop_kind == sc.TRACELOOP_TOOL_KIND:
        return sc.TYPE_TOOL
    if operation in AGENT_OPERATIONS or traceloop_kind in sc.TRACELOOP_AGENT_KINDS:
        return sc.TYPE_AGENT
    if operation in LLM_OPERATIONS or sc.GEN_AI_REQUEST_MODEL in attributes or "llm.request.type" in attributes:
        return sc.TYPE_LLM
    return sc.TYPE_OTHER


def first_of(value: Any) -> str | None:
    """First element of a sequence attribute (finish reasons), or the value itself if a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value:
        return str(value[0])
    return None


def as_int(value: Any) -> int | None:
    """An integer attribute, tolerating floats and numeric strings; ``None`` when not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def as_float(value: Any) -> float | None:
    """A float attribute, tolerating ints and numeric strings; ``None`` when not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


_INT_TYPES = frozenset({int})
_FLOAT_TYPES = frozenset({float})


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def int_list(value: Any) -> list[int] | None:
    """A token-id list attribute (a sequence of ints, or JSON text of one); None unless every id fits
    the column's int32 (one span's out-of-range ids must not fail the whole batch it is written in).
    """
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except ValueError:
            return None
    if type(value) in (tuple, list) and set(map(type, value)) <= _INT_TYPES:
        ids = list(value)  # the common case (hundreds of ids per span), checked at C speed
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        ids = list(value)
    else:
        return None
    return ids if not ids or (min(ids) >= _INT32_MIN and max(ids) <= _INT32_MAX) else None


def float_list(value: Any) -> list[float] | None:
    """A logprob list attribute (a sequence of numbers, or JSON text of one)."""
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except ValueError:
            return None
    if type(value) in (tuple, list) and set(map(type, value)) <= _FLOAT_TYPES:
        return list(value)  # the common case, checked at C speed; ``float(v)`` of a float is ``v``
    if isinstance(value, Sequence) and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    return None


def agent_name_of(attributes: Mapping[str, Any]) -> str | None:
    """The agent a span belongs to.

    In order: the user's explicit ``tracelearn.agent()`` / ``rollout(agent=)`` (baggage), the span's own
    ``gen_ai.agent.name`` or Traceloop agent entity, the LangGraph node it ran in, the name inherited
    from its ancestors at start, and last the span's own Traceloop workflow name.
    """
    for key in (sc.AGENT_NAME, sc.GEN_AI_AGENT_NAME):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    kind = attributes.get(sc.TRACELOOP_SPAN_KIND)
    entity = attributes.get(sc.TRACELOOP_ENTITY_NAME)
    if kind == "agent" and isinstance(entity, str) and entity:
        return entity
    node = attributes.get(sc.LANGGRAPH_NODE)
    if isinstance(node, str) and node:
        return node
    inherited = attributes.get(sc.AGENT_INHERITED)
    if isinstance(inherited, str) and inherited:
        return inherited
    if kind == "workflow" and isinstance(entity, str) and entity:
        return entity
    return None


def tool_name_of(name: str, attributes: Mapping[str, Any]) -> str | None:
    """Tool name of a tool span: gen_ai.tool.name, Traceloop's entity name, or the span name."""
    for key in (sc.GEN_AI_TOOL_NAME, sc.TRACELOOP_ENTITY_NAME):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    return name.removesuffix(".tool")
