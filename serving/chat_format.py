"""Chat messages to prompt token ids, and generated text back to tool calls.

Prompts are rendered by the tokenizer's own chat template (``apply_chat_template``), so the prompt
token ids the server reports are exactly what the model saw. Tools go through the template's
``tools=`` argument when the template renders them; otherwise they are described in the system
message in the Hermes / Qwen convention (``<tools>`` signatures, calls as JSON inside
``<tool_call></tool_call>``), which is also the format ``parse_tool_calls`` reads back. Earlier tool
calls and tool results in the conversation are rewritten into that same text format for templates
that know no tools, so the model sees one consistent convention; a tool result gets a turn of its own
(the ``tool`` role) when the template renders one, because a small model shown tool results as user
turns learns to write them itself (measured with SmolLM2-135M: 40% of replies called the calculator
with results in user turns, 88% with a ``tool`` turn, two worked examples before the question).
Parsing forgives what small models get wrong in an otherwise good call: an argument value without
quotes, a surplus closing brace, text after the call's JSON inside its tags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tracelearn.serving.text_output import partial_stop_length

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TAGGED_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# An object value written without quotes: what follows ``"key":`` up to the next , } or ] at that level.
_BARE_VALUE = re.compile(r'(?P<head>"\s*:\s*)(?P<value>[^\s"{\[][^,}\]]*?)(?P<tail>\s*[,}\]])')
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "tracelearn_probe", "description": "probe", "parameters": {"type": "object"}},
}


class ChatFormatError(ValueError):
    """The conversation cannot be rendered by the model's chat template (the message says why)."""


@dataclass(frozen=True)
class ToolCall:
    """A function call parsed from generated text; ``arguments`` is JSON text, as in the OpenAI API."""

    name: str
    arguments: str


def describe_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """System-message text that declares ``tools`` to a model whose template has no tools support."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call>"
    )


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content)


def _arguments_object(arguments: Any) -> Any:
    """Templates expect arguments as a mapping (they serialize it); OpenAI clients send JSON text."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _tool_call_text(call: Mapping[str, Any]) -> str:
    function = call.get("function", {})
    body = {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments", {}))}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def template_message(message: Mapping[str, Any], native_tools: bool, tool_role: bool = False) -> dict[str, Any]:
    """One OpenAI message in the form chat templates expect (``developer`` is a system message).

    Without native tools support a tool result is written in ``<tool_response>`` tags, in a turn of
    its own ``tool`` role when ``tool_role`` (the template renders any role), else as a user turn.
    """
    role = "system" if message["role"] == "developer" else str(message["role"])
    text = _text_of(message.get("content"))
    calls = message.get("tool_calls") or []
    if role == "assistant" and calls:
        if not native_tools:
            return {"role": role, "content": "\n".join([t for t in [text] if t] + [_tool_call_text(c) for c in calls])}
        rendered = []
        for call in calls:
            function = {**call["function"], "arguments": _arguments_object(call["function"].get("arguments"))}
            rendered.append({"type": "function", "function": function})
        return {"role": role, "content": text, "tool_calls": rendered}
    if role == "tool":
        if not native_tools:
            return {"role": "tool" if tool_role else "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
        extra = {k: message[k] for k in ("tool_call_id", "name") if message.get(k) is not None}
        return {"role": role, "content": text, **extra}
    return {"role": role, "content": text}


def with_system_text(conversation: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Append ``text`` to the leading system message, or start the conversation with one."""
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        return [{**first, "content": f"{first['content']}\n\n{text}" if first["content"] else text}, *conversation[1:]]
    return [{"role": "system", "content": text}, *conversation]


class ChatPromptBuilder:
    """Renders conversations with one tokenizer's chat template; knows whether it renders tools."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.native_tools = self._template_renders_tools()
        self.tool_role = not self.native_tools and self._template_renders_tool_role()

    def _render_text(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        return str(self.tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=True,
                                                       tokenize=False))

    def _template_renders_tools(self) -> bool:
        """Whether the template's output changes when tools are passed (many ignore ``tools=`` silently)."""
        probe = [{"role": "user", "content": "hello"}]
        try:
            return self._render_text(probe, [_PROBE_TOOL]) != self._render_text(probe, None)
        except Exception:  # a template that chokes on tools does not support them
            return False

    def _template_renders_tool_role(self) -> bool:
        """Whether the template renders a ``tool`` turn with its content (some accept only user/assistant)."""
        probe = [{"role": "user", "content": "hello"}, {"role": "tool", "content": "tracelearn-probe-result"}]
        try:
            text = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template that raises on unknown roles
            return False
        before, found, _ = str(text).partition("tracelearn-probe-result")
        return bool(found) and "tool" in before[-32:]

    def prompt_token_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        instruction: str | None = None,
    ) -> list[int]:
        """Token ids of the prompt for ``messages`` (ending with the assistant turn's opening), with
        ``tools`` declared and ``instruction`` added to the system message when given.
        """
        conversation = [template_message(m, self.native_tools, self.tool_role) for m in messages]
        native = list(tools) if tools and self.native_tools else None
        if tools and not self.native_tools:
            conversation = with_system_text(conversation, describe_tools(tools))
        if instruction:
            conversation = with_system_text(conversation, instruction)
        try:
            encoded = self.tokenizer.apply_chat_template(
                conversation, tools=native, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as error:  # jinja raises TemplateError / TypeError / custom exceptions
            raise ChatFormatError(f"the model's chat template rejected the messages: {error}") from error
        return [int(i) for i in encoded["input_ids"]]


def _quote_bare_value(match: re.Match[str]) -> str:
    value = match.group("value").rstrip()
    try:
        json.loads(value)  # a number, true, false or null stays as it is
    except json.JSONDecodeError:
        value = json.dumps(value)
    return f"{match.group('head')}{value}{match.group('tail')}"


def lenient_json(text: str, trailing: bool = False) -> Any:
    """``text`` as JSON, forgiving what small models get wrong in a call they otherwise wrote well: an
    argument value without quotes (``{"expression": 25 * 65}`` reads as ``"25 * 65"``), surplus closing
    braces at the end and, with ``trailing``, anything after the first complete value. Raises
    ``json.JSONDecodeError`` when it still does not parse.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        failure = error
    repaired = _BARE_VALUE.sub(_quote_bare_value, text.strip())
    for candidate in (repaired, repaired.rstrip("}").rstrip() + "}" * repaired.count("{")):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    if trailing:
        try:
            return json.JSONDecoder().raw_decode(repaired)[0]
        except json.JSONDecodeError:
            pass
    raise failure


def _as_tool_calls(text: str, tool_names: Collection[str], tagged: bool = False) -> list[ToolCall] | None:
    """Tool calls from one JSON text (an object or a list of objects with ``name`` and ``arguments``),
    or None when it is not that (inside tags, text after the first JSON value is ignored), or names a
    function that was not offered.
    """
    fenced = _FENCE.match(text.strip())
    try:
        parsed = lenient_json(fenced.group(1) if fenced else text, trailing=tagged)
    except json.JSONDecodeError:
        return None
    objects = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in objects:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if tool_names and item["name"] not in tool_names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                json.loads(arguments)
            except json.JSONDecodeError:
                return None
        elif not isinstance(arguments, dict):
            return None
        text_arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(item["name"], text_arguments))
    return calls or None


def parse_tool_calls(text: str, tool_names: Collection[str] = ()) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into (content, tool calls).

    Reads JSON inside ``<tool_call>...</tool_call>`` (an unclosed last tag counts: the model may end
    its turn before closing it), or, without tags, a reply that is nothing but a JSON object (or list)
    with ``name`` and ``arguments``. When ``tool_names`` is given, calls to other names are not calls.
    Without calls the text comes back unchanged; with calls the content is what remains, stripped,
    or None when nothing does.
    """
    calls: list[ToolCall] = []
    remaining: list[str] = []
    last = 0
    for match in _TAGGED_CALL.finditer(text):
        found = _as_tool_calls(match.group(1), tool_names, tagged=True)
        if found:
            remaining.append(text[last : match.start()])
            last = match.end()
            calls.extend(found)
    if not calls:
        bare = _as_tool_calls(text, tool_names) if text.strip() else None
        return (None, bare) if bare else (text, [])
    remaining.append(text[last:])
    content = "".join(remaining).strip()
    return content or None, calls


class ToolCallStream:
    """Streaming counterpart of ``parse_tool_calls``: passes text through as content while it cannot be
    part of a tool call, and buffers from the first sign of one (an opening tag, or a reply that starts
    with JSON) until the end, when the buffer is parsed.
    """

    def __init__(self, tool_names: Collection[str]) -> None:
        self._tool_names = tool_names
        self._pending = ""  # text not yet released: maybe the start of a tag, or leading whitespace
        self._buffer: str | None = None  # set once a tool call may have started
        self._released_text = False

    def feed(self, delta: str) -> str:
        """Add generated text; return the part that is certainly content."""
        if self._buffer is not None:
            self._buffer += delta
            return ""
        pending = self._pending + delta
        if not self._released_text and pending.lstrip().startswith(("{", "[", "```")):
            self._buffer, self._pending = pending, ""
            return ""
        tag = pending.find(TOOL_CALL_OPEN)
        if tag >= 0:
            self._buffer, self._pending = pending[tag:], ""
            return self._release(pending[:tag])
        if not self._released_text and not pending.strip():
            self._pending = pending
            return ""
        keep = partial_stop_length(pending, [TOOL_CALL_OPEN])
        self._pending = pending[len(pending) - keep :]
        return self._release(pending[: len(pending) - keep])

    def _release(self, text: str) -> str:
        self._released_text = self._released_text or bool(text.strip())
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still held back and the tool calls found in the buffered tail."""
        if self._buffer is None:
            return self._pending, []
        content, calls = parse_tool_calls(self._buffer, self._tool_names)
        if not calls:
            return self._pending + self._buffer, []
        return content or "", calls
