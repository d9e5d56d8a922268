"""The bundled example agent: arithmetic word problems solved with a calculator tool.

A plain OpenAI-SDK agent that knows nothing of tracelearn. Per task it runs a short loop (call the
model; run the tool calls it asks for and send back their results; stop at a message without tool
calls, or after ``--max-turns``), scores the final answer with ``reward.score`` and prints one JSON
line. Under ``opentelemetry-instrument`` its LLM calls are traced by the installed instrumentations;
the agent itself only uses the OpenTelemetry API: a ``calc.task`` span per task carrying the task id
and the gold answer (``tracelearn.metadata.gold``, read by a pipeline reward function, see
``pipeline.yaml``), and a ``tracelearn.reward`` child span with the reward (attribute names written
out, because the agent does not import tracelearn).

    opentelemetry-instrument python examples/calc/agent.py --tasks examples/calc/tasks.jsonl

The tool task (``products.jsonl``: two-digit products, which the default policy cannot work out in
its head) is run with worked exchanges before the question, which is how a small model learns the
tool-call format in context: ``--few-shot 2`` (two calculator exchanges) and ``--direct-example`` (one
small product answered without the tool, placed first). Each tool execution gets an
``execute_tool calculator`` span (OpenTelemetry GenAI convention), so rollouts count their tool calls.

Environment: ``OPENAI_BASE_URL`` (default http://127.0.0.1:8000/v1), ``OPENAI_API_KEY`` (default
"not-needed"), ``OPENAI_MODEL`` (default SmolLM2-135M-Instruct, or ``--model``).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import hashlib
import json
import operator
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from opentelemetry import trace
from reward import score

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Short on purpose: the default policy is a 135M model that loses the thread in long prompts.
SYSTEM_PROMPT = "Solve the arithmetic. Use the calculator tool, then reply with the number only."
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression such as 12 + 30.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 + 30"}},
            "required": ["expression"],
        },
    },
}

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
# Worked exchanges the agent can place before the question (--few-shot N): a small model copies a
# demonstrated tool call far more readily than it follows an instruction to make one.
WORKED_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("What is 12 times 34?", "12 * 34", "408"),
    ("What is 57 times 26?", "57 * 26", "1482"),
    ("What is 83 times 41?", "83 * 41", "3403"),
)
# A question small enough to answer without the tool (--direct-example): the prompt then shows both ways.
DIRECT_EXAMPLE = ("What is 7 times 8?", "56")
_MAX_EXPONENT = 64
_MAX_EXPRESSION_CHARS = 200

tracer = trace.get_tracer("examples.calc")


# --- The tool ---------------------------------------------------------------------------------------


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"{type(node).__name__} is not arithmetic")


def calculate(expression: str) -> str:
    """Evaluate arithmetic (numbers, + - * / // % ** and parentheses) without ``eval``."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError("expression is too long")
    value = _evaluate(ast.parse(expression.replace("^", "**"), mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


def run_tool(name: str, arguments: str) -> str:
    """A tool call's result; every failure (bad JSON, unknown tool, bad expression) is a result too."""
    try:
        if name != "calculator":
            return f"error: unknown tool {name!r}"
        parsed = json.loads(arguments or "{}")
        expression = parsed.get("expression") if isinstance(parsed, dict) else parsed
        if not isinstance(expression, str | int | float):
            return 'error: call calculator with {"expression": "..."}'
        return calculate(str(expression))
    except (ValueError, SyntaxError, ArithmeticError, RecursionError) as error:
        return f"error: {error}"


# --- The loop ---------------------------------------------------------------------------------------


@dataclass
class Task:
    id: str
    question: str
    answer: str
    sample: int = 0  # which of --samples runs of this task (each one its own rollout)


@dataclass
class Turn:
    """One assistant message, whether it came whole or in chunks."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, message: Any) -> Turn:
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls or ()
            if getattr(c, "function", None) is not None
        ]
        return cls(content=message.content or "", tool_calls=calls)

    def add_chunk(self, chunk: Any) -> None:
        for choice in chunk.choices[:1]:
            delta = choice.delta
            self.content += delta.content or ""
            for call in delta.tool_calls or ():
                while len(self.tool_calls) <= call.index:
                    self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                slot = self.tool_calls[call.index]
                slot["id"] = call.id or slot["id"]
                if call.function is not None:
                    slot["function"]["name"] += call.function.name or ""
                    slot["function"]["arguments"] += call.function.arguments or ""

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


@dataclass
class Settings:
    model: str
    max_turns: int
    max_tokens: int
    temperature: float
    stream: bool
    seed: int | None = None
    few_shot: int = 0
    direct_example: bool = False


def request_seed(base: int | None, task: Task, turn: int) -> int | None:
    """The sampling seed of one request: the same task, sample and turn draw the same seed in every run,
    so two model versions are compared on the same random numbers (a server that honours ``seed``)."""
    if base is None:
        return None
    digest = hashlib.sha256(f"{base}:{task.id}:{task.sample}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _request(settings: Settings, messages: list[dict[str, Any]], seed: int | None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": settings.model,
        "messages": messages,
        "tools": [CALCULATOR_TOOL],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": settings.stream,
    }
    if seed is not None:
        request["seed"] = seed
    return request


def worked_exchange(number: int) -> list[dict[str, Any]]:
    """One prior exchange: the question, the assistant's calculator call, the tool's result, the answer."""
    question, expression, result = WORKED_EXAMPLES[number]
    call = {"id": f"example-{number}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
            {"role": "assistant", "content": result}]


def _first_messages(task: Task, few_shot: int, direct_example: bool = False) -> list[dict[str, Any]]:
    examples = [message for number in range(few_shot) for message in worked_exchange(number)]
    if direct_example:  # first: the exchanges nearest the question weigh most with a small model
        question, answer = DIRECT_EXAMPLE
        examples = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}, *examples]
    return [{"role": "system", "content": SYSTEM_PROMPT}, *examples, {"role": "user", "content": task.question}]


@dataclass
class Outcome:
    """What one task's loop came to: the final answer, the tool calls made and the model calls taken."""

    answer: str = ""
    tool_calls: int = 0
    turns: int = 0


def _run_tool_call(call: dict[str, Any]) -> str:
    # A span per tool execution in the OpenTelemetry GenAI convention, so traces show the tool calls.
    name = call["function"]["name"]
    with tracer.start_as_current_span(f"execute_tool {name}", attributes={
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name, "gen_ai.tool.call.id": call["id"],
    }):
        return run_tool(name, call["function"]["arguments"])


def _after(turn: Turn, messages: list[dict[str, Any]], outcome: Outcome) -> bool:
    """Append the turn (and its tool results) to ``messages``; True when it was the final answer."""
    messages.append(turn.message())
    outcome.turns += 1
    if not turn.tool_calls:
        outcome.answer = turn.content.strip()
        return True
    for call in turn.tool_calls:
        outcome.tool_calls += 1
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": _run_tool_call(call)})
    return False


def solve(client: openai.OpenAI, settings: Settings, task: Task, outcome: Outcome) -> None:
    messages = _first_messages(task, settings.few_shot, settings.direct_example)
    for number in range(settings.max_turns):
        response = client.chat.completions.create(**_request(settings, messages, request_seed(settings.seed, task,
                                                                                              number)))
        turn = Turn()
        if settings.stream:
            for chunk in response:
                turn.add_chunk(chunk)
        else:
            turn = Turn.of(response.choices[0].message)
        if _after(turn, messages, outcome):
            return


async def solve_async(client: openai.AsyncOpenAI, settings: Settings, task: Task, outcome: Outcome) -> None:
    messages = _first_messages(task, settings.few_shot, settings.direct_example)
    for number in range(settings.max_turns):
        response = await client.chat.completions.create(
            **_request(settings, messages, request_seed(settings.seed, task, number))
        )
        turn = Turn()
        if settings.stream:
            async for chunk in response:
                turn.add_chunk(chunk)
        else:
            turn = Turn.of(response.choices[0].message)
        if _after(turn, messages, outcome):
            return


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
                tasks.append(Task(id=str(row["id"]), question=str(row["question"]), answer=str(row["answer"])))
            except KeyError as missing:
                raise SystemExit(f"{path}:{number}: task has no {missing} field (needs id, question, answer)") from None
    chosen = tasks[:limit] if limit is not None else tasks
    return [Task(t.id, t.question, t.answer, sample) for t in chosen for sample in range(samples)]


def _report(task: Task, outcome: Outcome, error: str | None) -> None:
    reward = score(outcome.answer, task.answer)
    with tracer.start_as_current_span(
        "tracelearn.reward",
        attributes={
            "tracelearn.span.type": "reward",
            "tracelearn.reward.name": "correct",
            "tracelearn.reward.value": reward,
            "tracelearn.reward.primary": True,
        },
    ):
        pass
    line = {"id": task.id, "sample": task.sample, "answer": outcome.answer, "gold": task.answer, "reward": reward,
            "correct": reward == 1.0, "tool_calls": outcome.tool_calls, "turns": outcome.turns}
    if error is not None:
        line["error"] = error
    # One write per line: tasks report from several threads at once (--concurrency).
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _task_attributes(task: Task) -> dict[str, str]:
    # The gold answer as rollout metadata lets the pipeline recompute the reward with another function
    # (reward: {function: reward.py:score, name: correct} in pipeline.yaml).
    return {"tracelearn.task.id": task.id, "tracelearn.metadata.gold": task.answer,
            "tracelearn.metadata.sample": str(task.sample)}


def run_task(client: openai.OpenAI, settings: Settings, task: Task) -> None:
    with tracer.start_as_current_span("calc.task", attributes=_task_attributes(task)):
        outcome, error = Outcome(), None
        try:
            solve(client, settings, task, outcome)
        except openai.APIError as failure:  # one failed task must not end the run
            error = f"{type(failure).__name__}: {failure}"
        _report(task, outcome, error)


def run(tasks: Iterable[Task], settings: Settings, base_url: str, api_key: str, concurrency: int = 1) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    # Several tasks in flight let a batching model server (vLLM, tracelearn serve) decode them together.
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(lambda task: run_task(client, settings, task), tasks):
            pass


async def run_async(tasks: Iterable[Task], settings: Settings, base_url: str, api_key: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
    for task in tasks:
        with tracer.start_as_current_span("calc.task", attributes=_task_attributes(task)):
            outcome, error = Outcome(), None
            try:
                await solve_async(client, settings, task, outcome)
            except openai.APIError as failure:
                error = f"{type(failure).__name__}: {failure}"
            _report(task, outcome, error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=Path, default=Path(__file__).with_name("tasks.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL", DEFAULT_MODEL))
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--stream", action="store_true", help="use streaming calls")
    parser.add_argument("--async", dest="use_async", action="store_true", help="use AsyncOpenAI")
    parser.add_argument("--concurrency", type=int, default=1, help="tasks in flight at once (sync mode)")
    parser.add_argument("--samples", type=int, default=1, help="run every task this many times (a GRPO group)")
    parser.add_argument("--seed", type=int, default=None, help="seed every request from this, the task and the turn")
    parser.add_argument("--few-shot", type=int, default=0, choices=range(len(WORKED_EXAMPLES) + 1),
                        help="worked exchanges (question, calculator call, result, answer) placed before the question")
    parser.add_argument("--direct-example", action="store_true",
                        help="also place an exchange answered without the tool (7 times 8) before the question")
    args = parser.parse_args(argv)
    tasks = read_tasks(args.tasks, args.limit, max(1, args.samples))
    settings = Settings(args.model, args.max_turns, args.max_tokens, args.temperature, args.stream, args.seed,
                        args.few_shot, args.direct_example)
    base_url = os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    api_key = os.environ.get("OPENAI_API_KEY") or "not-needed"
    if args.use_async:
        asyncio.run(run_async(tasks, settings, base_url, api_key))
    else:
        run(tasks, settings, base_url, api_key, max(1, args.concurrency))


if __name__ == "__main__":
    main()
