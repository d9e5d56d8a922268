"""The message codec: OpenAI chat messages <-> GenAI parts messages, and readers that never raise."""

import itertools
import json
import random
from typing import Any

from tracelearn.schemas import messages as mc

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+3?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
            {"id": "call_2", "type": "function", "function": {"name": "log", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
    {"role": "assistant", "content": "5", "reasoning_content": "2 and 3 make 5"},
]


def test_openai_messages_survive_the_round_trip_through_parts() -> None:
    parts = mc.openai_messages_to_parts(CONVERSATION)
    assert parts[2] == {
        "role": "assistant",
        "parts": [
            {"type": "tool_call", "id": "call_1", "name": "add", "arguments": '{"a": 2, "b": 3}'},
            {"type": "tool_call", "id": "call_2", "name": "log", "arguments": "{}"},
        ],
    }
    assert parts[3] == {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "5"}]}
    assert mc.parts_messages_to_openai(mc.compact_json(parts)) == (CONVERSATION, None)


def test_content_lists_keep_their_text_and_name_their_media() -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {}}]}
    assert mc.openai_message_to_parts(message) == {
        "role": "user",
        "parts": [{"type": "text", "content": "Look:"}, {"type": "image_url"}],
    }
    assert mc.parts_messages_to_openai([mc.openai_message_to_parts(message)]).messages == [
        {"role": "user", "content": "Look:"}
    ]


def test_system_instructions_are_parts_or_plain_text() -> None:
    assert mc.system_instructions_to_openai('[{"type": "text", "content": "be brief"}]') == (
        [{"role": "system", "content": "be brief"}],
        None,
    )
    assert mc.system_instructions_to_openai("be brief") == ([{"role": "system", "content": "be brief"}], None)


def test_openinference_flattened_messages() -> None:
    prefix = "llm.input_messages."
    attributes = {
        f"{prefix}0.message.role": "system",
        f"{prefix}0.message.contents.0.message_content.type": "text",
        f"{prefix}0.message.contents.0.message_content.text": "You add numbers.",
        f"{prefix}1.message.role": "assistant",
        f"{prefix}1.message.tool_calls.0.tool_call.id": "call_1",
        f"{prefix}1.message.tool_calls.0.tool_call.function.name": "add",
        f"{prefix}1.message.tool_calls.0.tool_call.function.arguments": '{"a": 2}',
        f"{prefix}10.message.role": "tool",
        f"{prefix}10.message.tool_call_id": "call_1",
        f"{prefix}10.message.content": "5",
        f"{prefix}2.message.role": "assistant",
        f"{prefix}2.message.contents.0.message_content.type": "reasoning",
        f"{prefix}2.message.contents.0.message_content.text": "thinking",
        f"{prefix}2.message.contents.1.message_content.type": "text",
        f"{prefix}2.message.contents.1.message_content.text": "answer",
        "llm.output_messages.0.message.role": "assistant",
    }
    decoded = mc.openinference_messages_to_openai(attributes, prefix)
    assert decoded.problem is None
    assert decoded.messages == [
        {"role": "system", "content": "You add numbers."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}],
        },
        {"role": "assistant", "content": "answer", "reasoning_content": "thinking"},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
    ]
    assert mc.openinference_messages_to_openai({}, prefix) == (None, None)


def _junk(rng: random.Random, depth: int = 0) -> Any:
    choices: list[Any] = [None, True, 3, -1.5, float("nan"), "x", "[{", '{"role": 1}', 2**80]
    if depth < 3:
        choices += [
            [_junk(rng, depth + 1) for _ in range(rng.randrange(4))],
            {
                rng.choice(["role", "parts", "type", "content", "id", "tool_calls", "function", "message", "x"]): _junk(
                    rng, depth + 1
                )
                for _ in range(rng.randrange(4))
            },
        ]
    return rng.choice(choices)


def test_no_reader_raises_on_any_input() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        value = _junk(rng)
        for reader in (mc.parts_messages_to_openai, mc.system_instructions_to_openai, mc.openai_messages_to_parts):
            reader(value)
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        mc.parts_messages_to_openai(text)
        mc.parts_messages_to_openai(text[: rng.randrange(len(text) + 1)])
        flat = {f"llm.input_messages.{i}.message.{k}": _junk(rng) for i, k in itertools.product(range(2), ["role"])}
        mc.openinference_messages_to_openai(
            {**flat, "llm.input_messages.0.message.tool_calls.0.x": value}, "llm.input_messages."
        )
        mc.flattened_messages_to_openai(
            {"gen_ai.prompt.0.content": value, "gen_ai.prompt.0.tool_calls.0.name": value}, "gen_ai.prompt."
        )
        mc.event_messages_to_openai(
            [("gen_ai.user.message", value), ("gen_ai.choice", {"message": value, "index": value})]
        )
        mc.events_attribute_to_openai(text)
        # Whatever was read is JSON the column can hold.
        decoded = mc.parts_messages_to_openai(value)
        if decoded.messages is not None:
            json.loads(mc.compact_json(decoded.messages))


def test_nesting_deeper_than_any_parser_is_a_problem_not_a_crash() -> None:
    assert mc.parts_messages_to_openai("[" * 100_000) == (None, "not JSON")
    deep: list[Any] = []
    inner = deep
    for _ in range(5_000):
        inner.append([])
        inner = inner[0]
    message = {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": deep}]}
    (tool,) = mc.parts_messages_to_openai([message]).messages or []
    assert tool["content"] == '"<list not representable as JSON>"'
