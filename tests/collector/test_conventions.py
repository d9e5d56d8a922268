"""Every convention lands in the same promoted columns: spans recorded from the real instrumentations.

The files in ``convention_spans/`` are what each package emitted (attributes and events copied as the
SDK held them; see each file's ``source``) for one task, "What is 17 times 23?", answered by a
calculator tool against ``tests/support/scripted_llm_server.py``: two LLM calls, the first asking for
the tool, the second answering with its result. Each goes through ``SpanColumns`` as the exporter and
the collector do.
"""

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tracelearn.collector.span_rows import SpanColumns, SpanRecord
from tracelearn.schemas import messages as mc
from tracelearn.schemas import semconv as sc

SPANS_DIR = Path(__file__).parent / "convention_spans"
START_NS = 1_800_000_000_000_000_000
SYSTEM = {"role": "system", "content": "You are a calculator agent."}
QUESTION = {"role": "user", "content": "What is 17 times 23?"}


def recorded(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SPANS_DIR / name).read_text(encoding="utf-8"))
    return loaded


def record_of(index: int, span: dict[str, Any]) -> SpanRecord:
    return SpanRecord(
        trace_id=1,
        span_id=int(span["span_id"], 16),
        parent_span_id=int(span["parent"], 16) if span["parent"] else None,
        name=span["name"],
        kind=span["kind"],
        start_ns=START_NS + index,
        end_ns=START_NS + index + 1,
        status_code=span["status"],
        status_message=None,
        resource={sc.SERVICE_NAME: "agent"},
        scope_name=span["scope"],
        attributes=span["attributes"],
        events=[(event["name"], START_NS, event["attributes"]) for event in span["events"]],
    )


def rows_of(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    columns = SpanColumns()
    for index, span in enumerate(spans):
        columns.add(record_of(index, span))
    batches = list(columns.take().values())
    return pa.Table.from_batches(batches).to_pylist()


def messages(text: str | None) -> list[dict[str, Any]] | None:
    return None if text is None else json.loads(text)


def tool_call_of(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (call,) = message["tool_calls"]
    return call["function"]["name"], json.loads(call["function"]["arguments"])


# file -> (LLM spans, of them the client calls with a response id, agent names, tools, system prompt as sent)
CASES = {
    "traceloop_openai.json": (2, 2, set(), set(), SYSTEM),
    "traceloop_openai_stream.json": (2, 2, set(), set(), SYSTEM),
    # openai.response (the Agents SDK's generation: input only) around each openai.chat
    "traceloop_openai_agents.json": (4, 2, {"math_agent"}, {"calculator"}, SYSTEM),
    "traceloop_crewai.json": (2, 2, {"Calculator"}, set(), None),
    "openai_v2_span_only.json": (2, 2, set(), set(), SYSTEM),
    "openinference_openai.json": (2, 2, set(), set(), SYSTEM),
    # generation (the Agents SDK's) around each ChatCompletion
    "openinference_openai_agents.json": (4, 2, {"math_agent"}, {"calculator"}, SYSTEM),
    # OpenAIModel.generate (smolagents') around each ChatCompletion; its last call is the final_answer tool
    "openinference_smolagents.json": (4, 2, {"math_agent"}, {"calculator", "final_answer"}, None),
    "openinference_pydantic_ai.json": (2, 2, {"math_agent"}, {"calculator"}, SYSTEM),
    "pydantic_ai.json": (2, 2, {"math_agent"}, {"calculator"}, SYSTEM),
    "pydantic_ai_instructions.json": (2, 2, {"math_agent"}, {"calculator"}, SYSTEM),
    "pydantic_ai_v6.json": (2, 2, {"math_agent"}, {"calculator"}, SYSTEM),
    "pydantic_ai_0.7_events_attribute.json": (2, 0, {"math_agent"}, {"calculator"}, SYSTEM),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_convention_lands_messages_tool_calls_tool_results_usage_and_names(name: str) -> None:
    llm_spans, client_calls, agents, tools, system = CASES[name]
    rows = rows_of(recorded(name)["spans"])
    llm = [row for row in rows if row["span_type"] == sc.TYPE_LLM]
    assert len(llm) == llm_spans
    assert {row["agent_name"] for row in rows} - {None} == agents
    assert {row["tool_name"] for row in rows if row["span_type"] == sc.TYPE_TOOL} == tools
    assert all(row["messages_problem"] is None for row in rows)
    assert all(row["operation_name"] == "chat" and row["request_model"] == "scripted-model" for row in llm)
    assert sum(1 for row in llm if row["response_id"]) == client_calls

    complete = [row for row in llm if row["output_messages"] is not None]
    first = next(row for row in complete if len(messages(row["input_messages"]) or []) <= 2)
    first_input = messages(first["input_messages"]) or []
    if system is not None:
        assert first_input[0] == system and first_input[1] == QUESTION
    (asked,) = messages(first["output_messages"]) or []
    assert tool_call_of(asked)[0] == "calculator" and asked["content"] in (None, "")
    assert first["input_tokens"] > 0 and first["output_tokens"] > 0
    assert first["request_temperature"] == pytest.approx(0.7)

    second = next(row for row in complete if len(messages(row["input_messages"]) or []) > 2)
    history = messages(second["input_messages"]) or []
    call_id = (messages(first["output_messages"]) or [{}])[0]["tool_calls"][0]["id"]
    if name != "openinference_smolagents.json":  # smolagents sends its tool call and result as text
        assert tool_call_of(history[-2]) == ("calculator", {"expression": "17 * 23"})
        assert history[-1] == {"role": "tool", "tool_call_id": call_id, "content": "391"}
        assert messages(second["output_messages"]) == [{"role": "assistant", "content": "The answer is 391."}]
        assert second["finish_reason"] in ("stop", None)
    if client_calls:
        assert {row["finish_reason"] for row in llm if row["response_id"]} >= {"tool_calls"}


def test_smolagents_own_roles_become_the_roles_the_model_saw() -> None:
    rows = rows_of(recorded("openinference_smolagents.json")["spans"])
    outer = [row for row in rows if row["name"] == "OpenAIModel.generate"]
    history = messages(outer[1]["input_messages"]) or []
    # smolagents' tool-call / tool-response messages reach the model as assistant / user text.
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[3]["content"] == "Observation:\n391"
    inner = next(row for row in rows if row["name"] == "ChatCompletion" and row["response_id"] == "chatcmpl-scripted-2")
    assert [m["role"] for m in messages(inner["input_messages"]) or []] == ["system", "user", "assistant", "user"]


def test_an_instrumentation_without_content_capture_lands_calls_without_messages() -> None:
    # The official instrumentation records content only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
    # set to SPAN_ONLY (what tracelearn's distro sets unless the user chose): without it, usage and ids only.
    rows = rows_of(recorded("openai_v2_default.json")["spans"])
    assert [row["span_type"] for row in rows] == [sc.TYPE_LLM, sc.TYPE_LLM]
    assert all(row["input_messages"] is None and row["messages_problem"] is None for row in rows)
    assert [row["input_tokens"] for row in rows] == [80, 191]


def test_the_log_event_forms_read_as_the_span_forms() -> None:
    # Pydantic AI 0.7's event mode "logs": one log record per message (event name in its attributes).
    logs = recorded("pydantic_ai_0.7_log_events.json")["logs"]
    by_span: dict[str, list[tuple[str, Any]]] = {}
    for log in logs:
        by_span.setdefault(log["span_id"], []).append((log["attributes"]["event.name"], log["body"]))
    from_logs = [mc.event_messages_to_openai(events) for events in by_span.values()]
    attribute_rows = [
        row
        for row in rows_of(recorded("pydantic_ai_0.7_events_attribute.json")["spans"])
        if row["span_type"] == sc.TYPE_LLM
    ]
    assert [(i.messages, o.messages) for i, o in from_logs] == [
        (messages(row["input_messages"]), messages(row["output_messages"])) for row in attribute_rows
    ]
    # The official instrumentation's EVENT_ONLY: the parts messages as structures in the log's attributes.
    (_, second) = recorded("openai_v2_event_only.json")["logs"]
    read = mc.parts_messages_to_openai(second["attributes"][sc.GEN_AI_INPUT_MESSAGES])
    assert read.problem is None and (read.messages or [])[-1] == {
        "role": "tool",
        "tool_call_id": "call_1_0",
        "content": "391",
    }


def test_message_events_on_spans_are_read_when_no_attribute_carries_messages() -> None:
    # The same event bodies as span events, whose attributes are flat (nested fields as JSON text).
    logs = [log for log in recorded("pydantic_ai_0.7_log_events.json")["logs"] if log["span_id"] == "f073d9e045008010"]
    events = [
        {
            "name": log["attributes"]["event.name"],
            "attributes": {k: v if isinstance(v, str | int) else json.dumps(v) for k, v in log["body"].items()},
        }
        for log in logs
    ]
    span = {
        "name": "chat scripted-model",
        "scope": "pydantic-ai",
        "kind": "INTERNAL",
        "span_id": "f073d9e045008010",
        "parent": None,
        "status": "UNSET",
        "attributes": {sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: "scripted-model"},
        "events": events,
    }
    (row,) = rows_of([span])
    assert messages(row["input_messages"]) == [
        SYSTEM,
        QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "17 * 23"}'},
                }
            ],
        },
        {"role": "tool", "content": "391", "tool_call_id": "call_1_0"},
    ]
    assert messages(row["output_messages"]) == [{"role": "assistant", "content": "The answer is 391."}]


def test_a_span_of_an_unknown_convention_lands_as_other_with_its_raw_attributes() -> None:
    span = {
        "name": "acme.generate",
        "scope": "acme.tracing",
        "kind": "CLIENT",
        "span_id": "00000000000000aa",
        "parent": None,
        "status": "OK",
        "attributes": {"acme.prompt": "What is 17 times 23?", "acme.tokens": 12, "acme.tags": ["a", "b"]},
        "events": [],
    }
    (row,) = rows_of([span])
    assert row["span_type"] == sc.TYPE_OTHER and row["scope_name"] == "acme.tracing"
    assert dict(row["attributes"]) == {
        "acme.prompt": "What is 17 times 23?",
        "acme.tokens": "12",
        "acme.tags": '["a","b"]',
    }


def test_malformed_message_json_from_an_instrumentation_lands_the_call_and_counts_the_problem() -> None:
    spans = recorded("traceloop_openai.json")["spans"]
    broken = json.loads(json.dumps(spans[1]))
    text = broken["attributes"][sc.GEN_AI_INPUT_MESSAGES]
    broken["attributes"][sc.GEN_AI_INPUT_MESSAGES] = text[: text.index('{"role": "tool"') + 10]  # cut short
    broken["attributes"][sc.GEN_AI_OUTPUT_MESSAGES] = "None"  # Python's str() where JSON belongs
    broken["span_id"] = "00000000000000bb"
    rows = rows_of([spans[0], broken])
    assert [row["messages_problem"] for row in rows] == [
        None,
        "gen_ai.input.messages: truncated JSON; gen_ai.output.messages: not JSON",
    ]
    assert [m["role"] for m in messages(rows[1]["input_messages"]) or []] == ["system", "user", "assistant"]
    assert rows[1]["output_messages"] is None and rows[1]["input_tokens"] == 191


def test_values_beyond_the_columns_types_land_as_nulls_without_failing_the_batch() -> None:
    (first, second) = recorded("traceloop_openai.json")["spans"]
    extreme = json.loads(json.dumps(first))
    extreme["attributes"].update(
        {
            sc.GEN_AI_USAGE_INPUT_TOKENS: 1e300,
            sc.GEN_AI_USAGE_OUTPUT_TOKENS: "9" * 30,
            sc.GEN_AI_REQUEST_TOP_K: 2**64,
            sc.GEN_AI_REQUEST_TEMPERATURE: "1e999",
            sc.GEN_AI_RESPONSE_ID: ["not", "text"],
        }
    )
    rows = rows_of([extreme, second])
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"], rows[0]["request_top_k"]) == (None, None, None)
    assert rows[0]["request_temperature"] == float("inf") and rows[0]["response_id"] == '["not","text"]'
    assert rows[1]["input_tokens"] == 191


@pytest.mark.parametrize("name", ["langgraph_traceloop.json", "langgraph_openinference.json"])
def test_langchain_create_agent_names_its_agent_not_its_graph_nodes(name: str) -> None:
    # Spans from the framework matrix (attribute values as the spans table stores them: text).
    rows = rows_of(recorded(name)["spans"])
    llm = [row for row in rows if row["span_type"] == sc.TYPE_LLM]
    assert len(llm) == 2 and {row["agent_name"] for row in llm} == {"calculator_agent"}
    assert [row["finish_reason"] for row in llm] == ["tool_calls", "stop"]
    # The response id joins the call with its token ids (OpenInference: read from LangChain's llm_output).
    assert all(row["response_id"].startswith("chatcmpl-") for row in llm)
    history = messages(llm[1]["input_messages"]) or []
    assert history[-1]["role"] == "tool" and history[-1]["content"] == "408"
    assert messages(llm[1]["output_messages"]) == [{"role": "assistant", "content": "408"}]
