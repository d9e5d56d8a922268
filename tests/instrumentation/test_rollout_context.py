"""Rollout identity and the emit API, through the real SDK into real Parquet files."""

import asyncio
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.threading import ThreadingInstrumentor
from support.capture import installed_capture

import tracelearn
from tracelearn.schemas.dataset import read_table


def span_rows(data: Path) -> list[dict[str, object]]:
    return read_table(data / "spans", "spans").drop_columns(["start_time", "end_time", "events"]).to_pylist()


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    with installed_capture(tmp_path):
        yield tmp_path


def llm_call(name: str = "chat") -> None:
    with trace.get_tracer("test").start_as_current_span(name, attributes={"gen_ai.operation.name": "chat"}):
        pass


def test_rollout_names_task_group_and_carries_rewards(tmp_path: Path) -> None:
    with installed_capture(tmp_path):
        with tracelearn.rollout(task_id="q-17", group="calc", metadata={"gold": 5}):
            llm_call()
            tracelearn.emit_reward({"correct": 1.0, "brevity": 0.25}, primary="correct")
            tracelearn.emit_annotation("difficulty", "easy")
            tracelearn.emit_message("assistant", "5")
    rows = span_rows(tmp_path)
    assert {r["task_id"] for r in rows} == {"q-17"} and {r["group_id"] for r in rows} == {"calc"}
    assert len({r["rollout_id"] for r in rows}) == 1
    rewards = {r["reward_name"]: (r["reward"], r["reward_is_primary"]) for r in rows if r["span_type"] == "reward"}
    assert rewards == {"correct": (1.0, True), "brevity": (0.25, False)}
    rollout_span = next(r for r in rows if r["span_type"] == "rollout")
    assert dict(rollout_span["attributes"])["tracelearn.metadata.gold"] == "5"
    message = next(r for r in rows if r["span_type"] == "message")
    assert message["output_messages"] == '[{"role":"assistant","content":"5"}]'


def test_a_bare_reward_is_named_reward_and_primary(tmp_path: Path) -> None:
    with installed_capture(tmp_path), tracelearn.rollout():
        tracelearn.emit_reward(0.5)
        tracelearn.emit_reward(math.nan)  # not recorded, warned
    rewards = [r for r in span_rows(tmp_path) if r["span_type"] == "reward"]
    assert [(r["reward_name"], r["reward"], r["reward_is_primary"]) for r in rewards] == [("reward", 0.5, True)]


def test_emit_reward_rejects_wrong_types_with_clear_errors() -> None:
    with pytest.raises(TypeError, match="must be a number"):
        tracelearn.emit_reward("1.0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="primary reward 'x' is not among"):
        tracelearn.emit_reward({"a": 1.0}, primary="x")


def test_rollout_identity_follows_threads_and_asyncio_tasks(tmp_path: Path) -> None:
    ThreadingInstrumentor().instrument()
    try:
        with installed_capture(tmp_path):

            async def agent_step() -> None:
                await asyncio.sleep(0)
                llm_call("in-task")

            async def run_async() -> None:
                await asyncio.gather(asyncio.create_task(agent_step()), asyncio.create_task(agent_step()))

            with tracelearn.rollout(task_id="t-1"):
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda _: llm_call("in-thread"), range(2)))
                asyncio.run(run_async())
    finally:
        ThreadingInstrumentor().uninstrument()
    rows = [r for r in span_rows(tmp_path) if r["name"] in ("in-thread", "in-task")]
    assert len(rows) == 4
    assert {r["task_id"] for r in rows} == {"t-1"}
    assert len({r["rollout_id"] for r in rows}) == 1


def test_the_decorator_makes_each_call_its_own_rollout(tmp_path: Path) -> None:
    @tracelearn.rollout(group="calc")
    def solve(question: str) -> str:
        llm_call()
        return question

    @tracelearn.rollout(group="calc")
    async def solve_async() -> None:
        llm_call()

    with installed_capture(tmp_path):
        solve("a")
        solve("b")
        asyncio.run(solve_async())
    llm_rows = [r for r in span_rows(tmp_path) if r["span_type"] == "llm"]
    assert len({r["rollout_id"] for r in llm_rows}) == 3
    assert {r["group_id"] for r in llm_rows} == {"calc"}


def test_an_exception_marks_the_rollout_failed_and_propagates(tmp_path: Path) -> None:
    with installed_capture(tmp_path), pytest.raises(RuntimeError), tracelearn.rollout(task_id="boom"):
        raise RuntimeError("agent crashed")
    rollout_span = next(r for r in span_rows(tmp_path) if r["span_type"] == "rollout")
    assert rollout_span["status_code"] == "ERROR"
    assert "agent crashed" in rollout_span["status_message"]


def test_agent_names_come_from_context_and_framework_ancestors(tmp_path: Path) -> None:
    tracer = trace.get_tracer("test")
    with installed_capture(tmp_path), tracelearn.rollout():
        with tracelearn.agent("planner"):
            llm_call("planner-call")
        # A Traceloop-style workflow whose top-level step is the agent; nested internals are not.
        with tracer.start_as_current_span("graph.workflow") as workflow:
            workflow.set_attribute("traceloop.span.kind", "workflow")
            workflow.set_attribute("traceloop.entity.name", "graph")
            with tracer.start_as_current_span("writer.task") as step:
                step.set_attribute("traceloop.span.kind", "task")
                step.set_attribute("traceloop.entity.name", "writer")
                with tracer.start_as_current_span("RunnableSequence.task") as inner:
                    inner.set_attribute("traceloop.span.kind", "task")
                    inner.set_attribute("traceloop.entity.name", "RunnableSequence")
                    llm_call("writer-call")
        with tracer.start_as_current_span("checker", attributes={"gen_ai.agent.name": "checker"}):
            llm_call("checker-call")
    agents = {r["name"]: r["agent_name"] for r in span_rows(tmp_path)}
    assert agents["planner-call"] == "planner"
    assert agents["writer-call"] == "writer"
    assert agents["checker-call"] == "checker"
