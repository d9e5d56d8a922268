"""Normalization of instrumentation attributes into the spans table's promoted columns."""

import json

from tracelearn.collector import normalize as nz
from tracelearn.schemas import semconv as sc

PARTS_INPUT = json.dumps(
    [
        {"role": "system", "parts": [{"type": "text", "content": "You add numbers."}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is 2+3?"}]},
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "call_1", "name": "calculator", "arguments": {"expression": "2+3"}}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "5"}]},
    ]
)


def test_parts_messages_become_openai_messages_with_tool_calls() -> None:
    messages = nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: PARTS_INPUT})
    assert messages == [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression":"2+3"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]


def test_output_messages_in_parts_form() -> None:
    output = json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "5"}], "finish_reason": "stop"}])
    assert nz.output_messages({sc.GEN_AI_OUTPUT_MESSAGES: output}) == [{"role": "assistant", "content": "5"}]


def test_system_instructions_are_prepended() -> None:
    attributes = {
        sc.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]),
        sc.GEN_AI_SYSTEM_INSTRUCTIONS: json.dumps([{"type": "text", "content": "be brief"}]),
    }
    assert nz.input_messages(attributes) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_old_flattened_traceloop_form() -> None:
    attributes = {
        "gen_ai.prompt.0.role": "user",
        "gen_ai.prompt.0.content": "What is 2+3?",
        "gen_ai.prompt.1.role": "assistant",
        "gen_ai.prompt.1.tool_calls.0.id": "call_1",
        "gen_ai.prompt.1.tool_calls.0.name": "calculator",
        "gen_ai.prompt.1.tool_calls.0.arguments": '{"expression":"2+3"}',
        "gen_ai.prompt.2.role": "tool",
        "gen_ai.prompt.2.tool_call_id": "call_1",
        "gen_ai.prompt.2.content": "5",
        "gen_ai.prompt.10.role": "user",
        "gen_ai.prompt.10.content": "later",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": "5",
        "gen_ai.completion.0.finish_reason": "stop",
    }
    messages = nz.input_messages(attributes)
    assert messages is not None
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]  # numeric, not text, order
    assert messages[1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression":"2+3"}'}
    assert messages[2]["tool_call_id"] == "call_1"
    assert nz.output_messages(attributes) == [{"role": "assistant", "content": "5"}]


def test_malformed_messages_yield_none_not_an_exception() -> None:
    assert nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: "{not json"}) is None
    assert nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: '{"role": "user"}'}) is None
    assert nz.input_messages({}) is None


def test_span_types() -> None:
    assert nz.span_type("openai.chat", {sc.GEN_AI_OPERATION_NAME: "chat"}) == sc.TYPE_LLM
    assert nz.span_type("chat gpt-4o", {sc.GEN_AI_REQUEST_MODEL: "gpt-4o"}) == sc.TYPE_LLM
    assert nz.span_type("calculator.tool", {sc.TRACELOOP_SPAN_KIND: "tool"}) == sc.TYPE_TOOL
    assert nz.span_type("execute_tool x", {sc.GEN_AI_OPERATION_NAME: "execute_tool"}) == sc.TYPE_TOOL
    assert nz.span_type("writer.agent", {sc.TRACELOOP_SPAN_KIND: "agent"}) == sc.TYPE_AGENT
    assert nz.span_type("tracelearn.reward", {sc.SPAN_TYPE: sc.TYPE_REWARD}) == sc.TYPE_REWARD
    assert nz.span_type("GET /", {}) == sc.TYPE_OTHER


def test_agent_name_precedence() -> None:
    assert nz.agent_name_of({sc.AGENT_NAME: "explicit", sc.GEN_AI_AGENT_NAME: "framework"}) == "explicit"
    assert nz.agent_name_of({sc.GEN_AI_AGENT_NAME: "framework", sc.AGENT_INHERITED: "outer"}) == "framework"
    assert nz.agent_name_of({sc.AGENT_INHERITED: "writer"}) == "writer"
    assert nz.agent_name_of({sc.TRACELOOP_SPAN_KIND: "workflow", sc.TRACELOOP_ENTITY_NAME: "graph"}) == "graph"
    assert nz.agent_name_of({}) is None


def test_attribute_values_become_text() -> None:
    assert nz.attribute_text("x") == "x"
    assert nz.attribute_text(3) == "3"
    assert nz.attribute_text(True) == "true"
    assert nz.attribute_text((1, 2)) == "[1,2]"
    assert nz.attribute_text(float("nan")) == "nan"
    assert nz.int_list((1, 2, 3)) == [1, 2, 3]
    assert nz.int_list("[4, 5]") == [4, 5]
    assert nz.int_list((1.5,)) is None
    assert nz.int_list([1, 2**31]) is None  # does not fit the int32 column: dropped, never fails the batch
    assert nz.float_list((-0.5, -1)) == [-0.5, -1.0]
