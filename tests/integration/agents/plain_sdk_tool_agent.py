"""A tool-using agent on the plain OpenAI SDK that opens no span of its own and knows nothing of tracelearn.

Per question it runs the usual loop: call the model with a calculator tool, run the tool calls it
asks for, send their results back, stop at a reply without tool calls. Under
``opentelemetry-instrument`` each LLM call is its own trace (nothing wraps them), which is what the
pipeline's conversation rule has to join back into one rollout per question.

    opentelemetry-instrument python plain_sdk_tool_agent.py --concurrency 2 "What is 2 plus 3?" ...

``--concurrency N`` runs N questions at once on threads; ``--async`` runs them all at once as
asyncio tasks on one thread. Prints one JSON line per question. Environment: ``OPENAI_BASE_URL``,
``OPENAI_API_KEY``.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import operator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

MODEL = "scripted"
TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
MAX_TURNS = 4


OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
    raise ValueError("arithmetic only")


def calculate(arguments: str) -> str:
    """The calculator: + - * / on numbers; every failure is a result the model reads."""
    try:
        value = evaluate(ast.parse(str(json.loads(arguments or "{}").get("expression", "")), mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError, AttributeError) as error:
        return f"error: {error}"
    return str(int(value) if float(value).is_integer() else value)


def first_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Use the calculator, then answer."}, {"role": "user", "content": question}]


def carry_on(messages: list[dict[str, Any]], message: Any) -> str | None:
    """Append the reply (and its tools' results) to ``messages``; the answer when it called no tool."""
    calls = message.tool_calls or []
    turn: dict[str, Any] = {"role": "assistant", "content": message.content}
    if calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls
        ]
    messages.append(turn)
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": calculate(c.function.arguments)})
    return None if calls else str(message.content)


def solve(client: openai.OpenAI, question: str) -> dict[str, Any]:
    messages = first_messages(question)
    for turn in range(MAX_TURNS):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[TOOL])  # type: ignore[arg-type]
        answer = carry_on(messages, reply.choices[0].message)
        if answer is not None:
            return {"question": question, "answer": answer, "llm_calls": turn + 1}
    return {"question": question, "answer": None, "llm_calls": MAX_TURNS}


async def solve_async(client: openai.AsyncOpenAI, question: str) -> dict[str, Any]:
    messages = first_messages(question)
    for turn in range(MAX_TURNS):
        reply = await client.chat.completions.create(model=MODEL, messages=messages, tools=[TOOL])  # type: ignore[arg-type]
        answer = carry_on(messages, reply.choices[0].message)
        if answer is not None:
            return {"question": question, "answer": answer, "llm_calls": turn + 1}
    return {"question": question, "answer": None, "llm_calls": MAX_TURNS}


async def solve_all(questions: list[str]) -> list[dict[str, Any]]:
    client = openai.AsyncOpenAI()
    return list(await asyncio.gather(*(solve_async(client, q) for q in questions)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--async", dest="use_async", action="store_true")
    args = parser.parse_args()
    if args.use_async:
        results = asyncio.run(solve_all(args.questions))
    else:
        client = openai.OpenAI()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            results = list(pool.map(lambda q: solve(client, q), args.questions))
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
