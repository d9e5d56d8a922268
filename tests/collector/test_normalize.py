"""Normalization of instrumentation attributes into the spans table's promoted columns."""

import json
import random
from typing import Any

from tracelearn.collector import attribute_values as av
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
    messages = nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: PARTS_INPUT}).messages
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
    assert nz.output_messages({sc.GEN_AI_OUTPUT_MESSAGES: output}).messages == [{"role": "assistant", "content": "5"}]


def test_system_instructions_are_prepended() -> None:
    attributes = {
        sc.GEN_AI_INPUT_MESSAGES: json.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]),
        sc.GEN_AI_SYSTEM_INSTRUCTIONS: json.dumps([{"type": "text", "content": "be brief"}]),
    }
    assert nz.input_messages(attributes).messages == [
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
    messages = nz.input_messages(attributes).messages
    assert messages is not None
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]  # numeric, not text, order
    assert messages[1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression":"2+3"}'}
    assert messages[2]["tool_call_id"] == "call_1"
    assert nz.output_messages(attributes).messages == [{"role": "assistant", "content": "5"}]


def test_malformed_messages_yield_what_could_be_read_and_name_the_problem() -> None:
    assert nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: "{not json"}) == (None, "not JSON")
    # One message where a list belongs is read as that message.
    one = nz.input_messages(
        {sc.GEN_AI_INPUT_MESSAGES: '{"role": "user", "parts": [{"type": "text", "content": "hi"}]}'}
    )
    assert one == ([{"role": "user", "content": "hi"}], None)
    assert nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: '"text"'}) == (None, "not a list of messages")
    assert nz.input_messages({}) == (None, None)
    # Cut short (an instrumentation's size limit): the complete leading messages are kept.
    truncated = PARTS_INPUT[: PARTS_INPUT.index('{"role": "tool"') + 20]
    kept = nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: truncated})
    assert kept.problem == "truncated JSON" and [m["role"] for m in kept.messages or []] == [
        "system",
        "user",
        "assistant",
    ]
    # Messages and parts that are not objects are skipped; the rest lands.
    mixed = json.dumps([7, {"role": "user", "parts": ["x", {"type": "text", "content": "hi"}]}])
    assert nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: mixed}) == (
        [{"role": "user", "content": "hi"}],
        "unreadable message",
    )


def test_llm_columns_name_the_attribute_with_the_problem() -> None:
    columns = nz.llm_columns(
        {
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_INPUT_MESSAGES: "[{broken",
            sc.GEN_AI_OUTPUT_MESSAGES: '[{"role": "assistant", "parts": [{"type": "text", "content": "5"}]}]',
            sc.GEN_AI_USAGE_INPUT_TOKENS: "12",
            sc.GEN_AI_USAGE_OUTPUT_TOKENS: 2**70,  # does not fit the int64 column: dropped, never fails the batch
            sc.GEN_AI_REQUEST_TEMPERATURE: "0.5",
            sc.GEN_AI_REQUEST_TOP_K: 40.0,
        }
    )
    assert columns.input_messages is None and columns.output_messages == '[{"role":"assistant","content":"5"}]'
    assert columns.messages_problem == "gen_ai.input.messages: not JSON"
    assert (columns.input_tokens, columns.output_tokens) == (12, None)
    assert (columns.temperature, columns.top_p, columns.top_k) == (0.5, None, 40)


def test_tool_results_of_every_writer_become_tool_messages() -> None:
    # Pydantic AI: the result is under "result", in a user message, next to the next user prompt.
    pydantic = json.dumps(
        [
            {
                "role": "user",
                "parts": [
                    {"type": "tool_call_response", "id": "c1", "name": "calc", "result": {"value": 5}},
                    {"type": "text", "content": "and now?"},
                ],
            }
        ]
    )
    assert nz.input_messages({sc.GEN_AI_INPUT_MESSAGES: pydantic}).messages == [
        {"role": "tool", "tool_call_id": "c1", "content": '{"value":5}'},
        {"role": "user", "content": "and now?"},
    ]


def test_reasoning_parts_stay_out_of_the_answer() -> None:
    output = json.dumps(
        [
            {
                "role": "assistant",
                "parts": [{"type": "reasoning", "content": "2+3 is 5"}, {"type": "text", "content": "5"}],
            }
        ]
    )
    assert nz.output_messages({sc.GEN_AI_OUTPUT_MESSAGES: output}).messages == [
        {"role": "assistant", "content": "5", "reasoning_content": "2+3 is 5"}
    ]


def test_span_types() -> None:
    assert nz.span_type("openai.chat", {sc.GEN_AI_OPERATION_NAME: "chat"}) == sc.TYPE_LLM
    assert nz.span_type("chat gpt-4o", {sc.GEN_AI_REQUEST_MODEL: "gpt-4o"}) == sc.TYPE_LLM
    assert nz.span_type("calculator.tool", {sc.TRACELOOP_SPAN_KIND: "tool"}) == sc.TYPE_TOOL
    assert nz.span_type("execute_tool x", {sc.GEN_AI_OPERATION_NAME: "execute_tool"}) == sc.TYPE_TOOL
    assert nz.span_type("writer.agent", {sc.TRACELOOP_SPAN_KIND: "agent"}) == sc.TYPE_AGENT
    assert nz.span_type("tracelearn.reward", {sc.SPAN_TYPE: sc.TYPE_REWARD}) == sc.TYPE_REWARD
    assert nz.span_type("GET /", {}) == sc.TYPE_OTHER
    # A span of a convention nobody knows is "other" (its raw attributes are kept, see test_conventions).
    assert nz.span_type("my.step", {"acme.kind": "LLM", "acme.model": "x"}) == sc.TYPE_OTHER
    assert nz.span_type("ChatCompletion", {sc.OPENINFERENCE_SPAN_KIND: "LLM"}) == sc.TYPE_LLM
    assert nz.span_type("retrieve", {sc.OPENINFERENCE_SPAN_KIND: "RETRIEVER"}) == sc.TYPE_OTHER
    assert nz.span_type("node", {sc.OPENINFERENCE_SPAN_KIND: "CHAIN", sc.OPENINFERENCE_GRAPH_NODE_ID: "w"}) == "agent"
    assert nz.span_type("turn", {sc.OPENINFERENCE_SPAN_KIND: "CHAIN"}) == sc.TYPE_OTHER


def test_agent_name_precedence() -> None:
    assert nz.agent_name_of({sc.AGENT_NAME: "explicit", sc.GEN_AI_AGENT_NAME: "framework"}) == "explicit"
    assert nz.agent_name_of({sc.GEN_AI_AGENT_NAME: "framework", sc.AGENT_INHERITED: "outer"}) == "framework"
    assert nz.agent_name_of({sc.AGENT_INHERITED: "writer"}) == "writer"
    assert nz.agent_name_of({sc.TRACELOOP_SPAN_KIND: "workflow", sc.TRACELOOP_ENTITY_NAME: "graph"}) == "graph"
    assert nz.agent_name_of({}) is None


def test_attribute_values_become_text() -> None:
    assert av.attribute_text("x") == "x"
    assert av.attribute_text(3) == "3"
    assert av.attribute_text(True) == "true"
    assert av.attribute_text((1, 2)) == "[1,2]"
    assert av.attribute_text(float("nan")) == "nan"
    assert av.int_list((1, 2, 3)) == [1, 2, 3]
    assert av.int_list("[4, 5]") == [4, 5]
    assert av.int_list((1.5,)) is None
    assert av.int_list([1, 2**31]) is None  # does not fit the int32 column: dropped, never fails the batch
    assert av.float_list((-0.5, -1)) == [-0.5, -1.0]


def test_no_attribute_value_makes_normalization_raise() -> None:
    # Attribute values over OTLP may be any AnyValue: lists, key-value lists (dicts), bytes, huge ints.
    rng = random.Random(11)
    keys = [
        sc.GEN_AI_OPERATION_NAME,
        sc.GEN_AI_INPUT_MESSAGES,
        sc.GEN_AI_OUTPUT_MESSAGES,
        sc.GEN_AI_SYSTEM_INSTRUCTIONS,
        sc.GEN_AI_USAGE_INPUT_TOKENS,
        sc.GEN_AI_REQUEST_MODEL,
        sc.GEN_AI_RESPONSE_FINISH_REASONS,
        sc.GEN_AI_REQUEST_TEMPERATURE,
        sc.GEN_AI_REQUEST_TOP_K,
        sc.GEN_AI_EVENTS_ATTRIBUTE,
        sc.GEN_AI_AGENT_NAME,
        sc.OPENINFERENCE_SPAN_KIND,
        sc.OPENINFERENCE_INVOCATION_PARAMETERS,
        sc.OPENINFERENCE_METADATA,
        sc.OPENINFERENCE_OUTPUT_VALUE,
        sc.OPENINFERENCE_PROMPT_TOKENS,
        "llm.input_messages.0.message.role",
        "llm.input_messages.0.message.contents.0.message_content.text",
        "gen_ai.prompt.0.tool_calls.0.arguments",
        sc.TRACELOOP_SPAN_KIND,
        sc.SPAN_TYPE,
    ]
    values: list[Any] = [
        None,
        "",
        "LLM",
        "chat",
        "[{",
        "{}",
        '{"id":"',
        2**70,
        -1.0,
        float("inf"),
        1e300,
        "9" * 30,
        b"\xff",
        [1, "a"],
        {"k": [1]},
        ("stop",),
        True,
        '{"langgraph_node": 3}',
        '[{"role": "user", "parts": 5}]',
    ]
    for _ in range(3000):
        attributes = {key: rng.choice(values) for key in rng.sample(keys, rng.randrange(len(keys)))}
        events = [(rng.choice(["gen_ai.choice", "gen_ai.user.message", "x"]), 0, {"message": rng.choice(values)})]
        kind = nz.span_type("x.run", attributes)
        nz.agent_name_of(attributes, "x.run")
        nz.operation_name_of(kind, attributes)
        nz.llm_columns(attributes, events)


def test_model_version_prefers_ours_then_each_conventions_system_fingerprint() -> None:
    call = {sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: "m"}
    assert nz.llm_columns(call).model_version is None
    for key in sc.OPENAI_SYSTEM_FINGERPRINTS:  # Traceloop's, the official instrumentation's, semconv_ai's
        assert nz.llm_columns({**call, key: "fp_1"}).model_version == "fp_1"
    both = {**call, sc.MODEL_VERSION: "calc-policy@4+b1c5bf429df1", "openai.response.system_fingerprint": "fp_1"}
    assert nz.llm_columns(both).model_version == "calc-policy@4+b1c5bf429df1"
    # The gateway writes "unknown" when neither the server's header nor a fingerprint said: no version.
    assert nz.llm_columns({**call, sc.MODEL_VERSION: "unknown", "gen_ai.openai.system_fingerprint": "fp_2"}) \
        .model_version == "fp_2"
