"""Prompts from chat templates (with and without native tools support), and tool calls parsed back."""

import json
from typing import Any

import pytest
from support.tiny_model import build_tokenizer

from tracelearn.serving.chat_format import ChatPromptBuilder, ToolCall, ToolCallStream, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
NAMES = {"get_weather", "add"}


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         None, [ToolCall("get_weather", '{"city": "Paris"}')]),
        ('Let me check. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
         "Let me check.", [ToolCall("add", '{"a": 1, "b": 2}')]),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n'
         '<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>',
         None, [ToolCall("add", '{"a": 1}'), ToolCall("get_weather", '{"city": "Oslo"}')]),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}', None, [ToolCall("add", '{"a": 1}')]),  # unclosed
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}',
         None, [ToolCall("get_weather", '{"city": "Lima"}')]),
        ('```json\n[{"name": "add", "arguments": {}}]\n```', None, [ToolCall("add", "{}")]),
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered tool
         '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
        # What a small model gets wrong in a call it otherwise wrote well: an unquoted expression, a
        # surplus closing brace, keys after the call's object.
        ('<tool_call>\n{"name": "add", "arguments": {"expression": 25 * 65}}}\n</tool_call>',
         None, [ToolCall("add", '{"expression": "25 * 65"}')]),
        ('<tool_call>{"name": "add", "arguments": {"a": 3, "b": two}}, "required": ["a"]}</tool_call>',
         None, [ToolCall("add", '{"a": 3, "b": "two"}')]),
        ('{"name": "add", "arguments": {"a": 1}} and then some', '{"name": "add", "arguments": {"a": 1}} and then some',
         []),  # without tags, only a reply that is nothing but the call is one
        ('{"city": "Paris"}', '{"city": "Paris"}', []),
        ("  Plain answer, kept exactly.\n", "  Plain answer, kept exactly.\n", []),
    ],
)
def test_parse_tool_calls(text: str, content: str | None, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text, NAMES) == (content, calls)


def stream_through(text: str, piece: int) -> tuple[str, list[ToolCall]]:
    stream = ToolCallStream(NAMES)
    shown = "".join(stream.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    rest, calls = stream.finish()
    return shown + rest, calls


@pytest.mark.parametrize("piece", [1, 3, 50])
def test_tool_call_stream_agrees_with_the_parser(piece: int) -> None:
    call = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    assert stream_through(f"Sure. {call}", piece) == ("Sure. ", [ToolCall("add", '{"a": 1}')])
    assert stream_through('{"name": "add", "arguments": {}}', piece) == ("", [ToolCall("add", "{}")])
    for plain in ["No tools needed <tool", "a < b and <tool_call> is just text", '{"json": "but no call"}']:
        assert stream_through(plain, piece) == (plain, [])


def test_tool_call_stream_holds_back_only_what_may_be_a_tag() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed("Hello <tool") == "Hello "
    assert stream.feed("box> world") == "<toolbox> world"


@pytest.fixture(scope="module")
def native() -> ChatPromptBuilder:
    return ChatPromptBuilder(build_tokenizer())


@pytest.fixture(scope="module")
def fallback() -> ChatPromptBuilder:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return ChatPromptBuilder(tokenizer)


HISTORY: list[dict[str, Any]] = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def decoded(builder: ChatPromptBuilder, ids: list[int]) -> str:
    return str(builder.tokenizer.decode(ids))


def test_template_with_tools_support_gets_them_natively(native: ChatPromptBuilder) -> None:
    assert native.native_tools
    prompt = decoded(native, native.prompt_token_ids(HISTORY, [WEATHER]))
    assert json.dumps(WEATHER) in prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<|im_start|>tool\nsunny<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_template_without_tools_support_gets_a_system_description(fallback: ChatPromptBuilder) -> None:
    assert not fallback.native_tools
    prompt = decoded(fallback, fallback.prompt_token_ids(HISTORY, [WEATHER], "You must call get_weather."))
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER) in system and system.endswith("You must call get_weather.")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    # Tool results get a turn of their own: the model does not learn to write them in its own turns.
    assert fallback.tool_role
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt


def test_a_template_that_knows_only_user_and_assistant_gets_tool_results_as_a_user_turn() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    builder = ChatPromptBuilder(tokenizer)
    assert not builder.native_tools and not builder.tool_role
    prompt = decoded(builder, builder.prompt_token_ids(HISTORY, [WEATHER]))
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt


def test_prompt_ids_are_the_templates_own_tokenization(native: ChatPromptBuilder) -> None:
    messages = [{"role": "user", "content": "hi"}]
    expected = native.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
    assert native.prompt_token_ids(messages) == list(expected)
