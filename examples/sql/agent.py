"""The bundled multi-agent example: text-to-SQL with a writer and a checker, on a LangGraph graph.

A LangGraph agent that knows nothing of tracelearn. Per task, the ``writer`` node writes one SQLite
query for the question given the schema; the ``checker`` node runs it (read-only, on the shop
database) and reviews the query with its result or error, replying ACCEPT or REJECT with a note;
a rejection goes back to the writer with the note, for at most ``--max-rounds`` drafts. The last
draft is the answer: it runs on the database, scores 1.0 when its rows match the gold query's
(``reward.execution_match``) and the agent prints one JSON line.

Under ``opentelemetry-instrument`` Traceloop's LangChain instrumentation traces the graph: each
node is a task span named after it, so every LLM call carries its role (``writer`` or ``checker``)
as the agent name. The agent itself only uses the OpenTelemetry API: a ``sql.task`` span per task
with the task id and the gold query (``tracelearn.metadata.gold_sql``, which the pipeline's reward
function reads, see ``pipeline.yaml``), and a ``tracelearn.reward`` child span with the reward it
observed (attribute names written out, because the agent does not import tracelearn).

    opentelemetry-instrument python examples/sql/agent.py --tasks examples/sql/tasks.jsonl

Environment: ``OPENAI_BASE_URL`` (default http://127.0.0.1:8000/v1), ``OPENAI_API_KEY`` (default
"not-needed"), ``OPENAI_MODEL`` (default SmolLM2-135M-Instruct, or ``--model``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import openai
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from opentelemetry import trace
from reward import QueryError, execution_match, extract_sql, run_select, schema_text

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Short on purpose: the default policy is a 135M model that loses the thread in long prompts.
WRITER_PROMPT = "Write one SQLite query that answers the question. Reply with the SQL only."
CHECKER_PROMPT = (
    "Review the SQLite query. If it answers the question, reply ACCEPT. Otherwise reply REJECT and say what to fix."
)
_VERDICT = re.compile(r"\b(ACCEPT|REJECT)", re.IGNORECASE)
_PREVIEW_ROWS = 5
_PREVIEW_CHARS = 300

tracer = trace.get_tracer("examples.sql")


# --- The roles --------------------------------------------------------------------------------------


@dataclass
class Task:
    id: str
    question: str
    gold_sql: str
    sample: int = 0  # which of --samples runs of this task (each one its own rollout)


@dataclass
class Settings:
    model: str
    max_rounds: int
    max_tokens: int
    temperature: float
    seed: int | None = None


class Review(TypedDict, total=False):
    """The graph's state: the task, the writer's drafts, and what the checker made of each."""

    task_id: str
    sample: int
    question: str
    drafts: list[str]  # the writer's replies, oldest first
    sql: str  # the query in the latest draft
    outcomes: list[str]  # what running each draft's query gave
    notes: list[str]  # the checker's replies
    accepted: bool


def request_seed(base: int | None, task_id: str, sample: int, role: str, round_: int) -> int | None:
    """The sampling seed of one request: the same task, sample, role and round draw the same seed in
    every run, so two model versions are compared on the same random numbers."""
    if base is None:
        return None
    digest = hashlib.sha256(f"{base}:{task_id}:{sample}:{role}:{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def describe_outcome(sql: str) -> str:
    """What running ``sql`` gives, as the checker reads it: the first rows, or the error."""
    try:
        rows = run_select(sql)
    except QueryError as error:
        return f"Error: {error.detail}" if error.reason == "error" else f"Error ({error.reason}): {error.detail}"
    preview = ", ".join(str(row) for row in rows[:_PREVIEW_ROWS])
    more = f" (and {len(rows) - _PREVIEW_ROWS} more)" if len(rows) > _PREVIEW_ROWS else ""
    return f"Result: {len(rows)} rows: {preview[:_PREVIEW_CHARS]}{more}"


def accepted(review: str) -> bool:
    """Whether the checker accepted: its first ACCEPT/REJECT says so; a review with neither rejects."""
    verdict = _VERDICT.search(review)
    return verdict is not None and verdict.group(1).upper() == "ACCEPT"


def writer_messages(question: str, drafts: list[str], outcomes: list[str], notes: list[str]) -> list[BaseMessage]:
    messages: list[BaseMessage] = [
        SystemMessage(WRITER_PROMPT),
        HumanMessage(f"Tables:\n{schema_text()}\n\nQuestion: {question}"),
    ]
    for draft, outcome, note in zip(drafts, outcomes, notes, strict=True):
        messages.append(AIMessage(draft))
        messages.append(HumanMessage(f"{outcome}\nA reviewer sent it back: {note}\nWrite the corrected SQL only."))
    return messages


def checker_messages(question: str, sql: str, outcome: str) -> list[BaseMessage]:
    return [
        SystemMessage(CHECKER_PROMPT),
        HumanMessage(f"Tables:\n{schema_text()}\n\nQuestion: {question}\nQuery: {sql}\n{outcome}"),
    ]


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content)


def build_graph(llm: ChatOpenAI, settings: Settings) -> Any:
    """The writer -> checker loop as a compiled LangGraph graph (node names are the agent names)."""

    def ask(messages: list[BaseMessage], state: Review, role: str, round_: int) -> str:
        seed = request_seed(settings.seed, state["task_id"], state["sample"], role, round_)
        return _text(llm.invoke(messages, **({"seed": seed} if seed is not None else {})))

    def writer(state: Review) -> Review:
        drafts, outcomes, notes = state.get("drafts", []), state.get("outcomes", []), state.get("notes", [])
        reply = ask(writer_messages(state["question"], drafts, outcomes, notes), state, "writer", len(drafts))
        return {"drafts": [*drafts, reply], "sql": extract_sql(reply)}

    def checker(state: Review) -> Review:
        notes, outcomes = state.get("notes", []), state.get("outcomes", [])
        outcome = describe_outcome(state["sql"])
        review = ask(checker_messages(state["question"], state["sql"], outcome), state, "checker", len(notes))
        return {"notes": [*notes, review], "outcomes": [*outcomes, outcome], "accepted": accepted(review)}

    def after_review(state: Review) -> str:
        if state.get("accepted") or len(state.get("drafts", [])) >= settings.max_rounds:
            return END
        return "writer"

    graph = StateGraph(Review)
    graph.add_node("writer", writer)
    graph.add_node("checker", checker)
    graph.add_edge(START, "writer")
    graph.add_edge("writer", "checker")
    graph.add_conditional_edges("checker", after_review, ["writer", END])
    return graph.compile()


# --- Tasks, rewards, output ---------------------------------------------------------------------------


def read_tasks(path: Path, limit: int | None, samples: int = 1) -> list[Task]:
    """The tasks of a JSONL file (the first ``limit``), each repeated ``samples`` times (sample 0, 1, ...)."""
    tasks = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                tasks.append(Task(id=str(row["id"]), question=str(row["question"]), gold_sql=str(row["gold_sql"])))
            except KeyError as missing:
                needs = "needs id, question, gold_sql"
                raise SystemExit(f"{path}:{number}: task has no {missing} field ({needs})") from None
    chosen = tasks[:limit] if limit is not None else tasks
    return [Task(t.id, t.question, t.gold_sql, sample) for t in chosen for sample in range(samples)]


def _report(task: Task, state: Review, error: str | None) -> None:
    sql = state.get("sql", "")
    reward = execution_match(sql, task.gold_sql)
    with tracer.start_as_current_span(
        "tracelearn.reward",
        attributes={
            "tracelearn.span.type": "reward",
            "tracelearn.reward.name": "execution_match",
            "tracelearn.reward.value": reward,
            "tracelearn.reward.primary": True,
        },
    ):
        pass
    line: dict[str, Any] = {
        "id": task.id,
        "sample": task.sample,
        "question": task.question,
        "sql": sql,
        "rounds": len(state.get("drafts", [])),
        "accepted": bool(state.get("accepted")),
        "result": describe_outcome(sql) if sql else "",
        "gold_sql": task.gold_sql,
        "reward": reward,
        "correct": reward == 1.0,
    }
    if error is not None:
        line["error"] = error
    # One write per line: tasks report from several threads at once (--concurrency).
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _task_attributes(task: Task) -> dict[str, str]:
    # The gold query as rollout metadata lets the pipeline recompute the reward
    # (reward: {function: reward.py:score} in pipeline.yaml).
    return {"tracelearn.task.id": task.id, "tracelearn.metadata.gold_sql": task.gold_sql,
            "tracelearn.metadata.sample": str(task.sample)}  # fmt: skip


def run_task(app: Any, settings: Settings, task: Task) -> None:
    with tracer.start_as_current_span("sql.task", attributes=_task_attributes(task)):
        state: Review = {}
        error = None
        try:
            state = app.invoke(
                {"task_id": task.id, "sample": task.sample, "question": task.question},
                {"recursion_limit": 2 * settings.max_rounds + 2},
            )
        except openai.APIError as failure:  # one failed task must not end the run
            error = f"{type(failure).__name__}: {failure}"
        _report(task, state, error)


def run(tasks: Iterable[Task], settings: Settings, base_url: str, api_key: str, concurrency: int = 1) -> None:
    llm = ChatOpenAI(
        model=settings.model,
        base_url=base_url,
        api_key=api_key,  # type: ignore[arg-type]
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,  # type: ignore[call-arg]
        timeout=300,
        max_retries=1,
    )
    app = build_graph(llm, settings)
    # Several tasks in flight let a batching model server (vLLM, tracelearn serve) decode them together.
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(lambda task: run_task(app, settings, task), tasks):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=Path, default=Path(__file__).with_name("tasks.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", DEFAULT_MODEL))
    parser.add_argument("--max-rounds", type=int, default=3, help="drafts the writer may write per task")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--concurrency", type=int, default=1, help="tasks in flight at once")
    parser.add_argument("--samples", type=int, default=1, help="run every task this many times (a GRPO group)")
    parser.add_argument("--seed", type=int, default=None, help="seed every request from this, the task and the turn")
    args = parser.parse_args(argv)
    if args.max_rounds < 1:
        parser.error("--max-rounds must be at least 1")
    tasks = read_tasks(args.tasks, args.limit, max(1, args.samples))
    settings = Settings(args.model, args.max_rounds, args.max_tokens, args.temperature, args.seed)
    base_url = os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    api_key = os.environ.get("OPENAI_API_KEY") or "not-needed"
    run(tasks, settings, base_url, api_key, max(1, args.concurrency))


if __name__ == "__main__":
    main()
