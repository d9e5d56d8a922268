"""The bundled calc agent, in process against the scripted server: its tool, its reward, its loop."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.scripted_llm_server import Reply, ScriptedLLMServer, ScriptedToolCall, default_script

CALC = Path(__file__).resolve().parents[2] / "examples" / "calc"


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(CALC))  # agent.py imports its sibling reward.py
    spec = importlib.util.spec_from_file_location("calc_agent", CALC / "agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "calc_agent", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("expression", "result"),
    [("12 + 30", "42"), ("7 * 6", "42"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"), ("2 ^ 10", "1024"), ("-4 + 1", "-3")],
)
def test_calculator(agent: ModuleType, expression: str, result: str) -> None:
    assert agent.calculate(expression) == result


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("calculator", "{not json", "error:"),
        ("calculator", '{"expression": "__import__(\'os\')"}', "error: Call is not arithmetic"),
        ("calculator", '{"expression": "1 / 0"}', "error: division by zero"),
        ("calculator", '{"expression": "2 ** 1000"}', "error: exponent"),
        ("calculator", '{"x": ["1"]}', "error: call calculator with"),
        ("weather", "{}", "error: unknown tool 'weather'"),
    ],
)
def test_a_bad_tool_call_becomes_an_error_result(agent: ModuleType, name: str, arguments: str, error: str) -> None:
    assert agent.run_tool(name, arguments).startswith(error)


def test_reward_is_the_final_number(agent: ModuleType) -> None:
    from reward import score

    replies = ("42", "42.", "The answer is 42.", "40 + 2 = 42", "42 or 43", "24", "", "1,042")
    assert [score(a, "42") for a in replies] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert score("1,042", "1042") == 1.0


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--async"], ["--async", "--stream"]], ids=str)
def test_the_agent_solves_tasks_and_reports_rewards_as_spans(
    agent: ModuleType,
    scripted_llm_server: ScriptedLLMServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(agent, "tracer", provider.get_tracer("examples.calc"))
    monkeypatch.setenv("OPENAI_BASE_URL", scripted_llm_server.base_url)

    agent.main(["--tasks", str(CALC / "tasks.jsonl"), "--limit", "2", *flags])

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["id"], line["answer"], line["reward"]) for line in lines] == [
        ("calc-001", "4", 1.0),
        ("calc-002", "4", 1.0),
    ]
    # Two turns per task: the tool call, then the answer after the tool result.
    assert len(scripted_llm_server.chat_requests()) == 4
    tasks = {s.context.span_id: s for s in exporter.get_finished_spans() if s.name == "calc.task"}
    rewards = [s for s in exporter.get_finished_spans() if s.name == "tracelearn.reward"]
    assert sorted((t.attributes or {})["tracelearn.task.id"] for t in tasks.values()) == ["calc-001", "calc-002"]
    for reward in rewards:
        assert reward.parent is not None and reward.parent.span_id in tasks
        assert dict(reward.attributes or {}) == {
            "tracelearn.span.type": "reward",
            "tracelearn.reward.name": "correct",
            "tracelearn.reward.value": 1.0,
            "tracelearn.reward.primary": True,
        }


def test_a_malformed_tool_call_is_answered_with_an_error_not_a_crash(
    agent: ModuleType,
    scripted_llm_server: ScriptedLLMServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken_arguments(body: dict[str, Any]) -> Reply:
        if not any(m["role"] == "tool" for m in body["messages"]):
            return Reply(tool_calls=(ScriptedToolCall("calculator", '{"expression": "3 +'),))
        return default_script(body)

    scripted_llm_server.script = broken_arguments
    monkeypatch.setenv("OPENAI_BASE_URL", scripted_llm_server.base_url)
    agent.main(["--tasks", str(CALC / "tasks.jsonl"), "--limit", "1"])

    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["answer"].startswith("error:") and line["reward"] == 0.0
    tool_message = scripted_llm_server.chat_requests()[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"].startswith("error:")


def test_worked_examples_go_before_the_question_and_each_line_counts_tool_calls_and_turns(
    agent: ModuleType,
    scripted_llm_server: ScriptedLLMServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(agent, "tracer", provider.get_tracer("examples.calc"))
    monkeypatch.setenv("OPENAI_BASE_URL", scripted_llm_server.base_url)

    def after_the_question(body: dict[str, Any]) -> Reply:
        # The worked examples hold tool results too: only what follows the last user turn counts.
        messages = body["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        return default_script({**body, "messages": messages[last_user:]})

    scripted_llm_server.script = after_the_question
    agent.main(["--tasks", str(CALC / "products.jsonl"), "--limit", "1", "--few-shot", "2", "--direct-example"])

    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (line["tool_calls"], line["turns"]) == (1, 2)
    messages = scripted_llm_server.chat_requests()[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] + ["user", "assistant", "tool",
                                                                                "assistant"] * 2 + ["user"]
    assert messages[1]["content"] == "What is 7 times 8?" and messages[-1]["content"] == "What is 24 times 73?"
    call = messages[4]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"expression": "12 * 34"} and messages[5]["content"] == "408"
    (tool_span,) = [s for s in exporter.get_finished_spans() if s.name == "execute_tool calculator"]
    assert dict(tool_span.attributes or {})["gen_ai.operation.name"] == "execute_tool"


def test_the_worked_examples_are_right_and_not_among_the_product_tasks(agent: ModuleType) -> None:
    questions = {json.loads(line)["question"] for name in ("products.jsonl", "products_heldout.jsonl")
                 for line in (CALC / name).read_text().splitlines()}
    for question, expression, result in agent.WORKED_EXAMPLES:
        assert agent.calculate(expression) == result and question not in questions
