"""A plain OpenAI-SDK tool agent that opens no span of its own (no OpenTelemetry import at all).

Per question: call the model with the calculator tool, run the calls it asks for, send the results
back, stop at an answer. Its rollouts can only be rebuilt from the conversation.

    python openai_sdk_plain.py [QUESTION...]      # OPENAI_BASE_URL, LLM_API_KEY (default not-needed)
"""

import json
import os
import sys
from typing import Any

import openai
from calculator import DEFAULT_QUESTIONS, INSTRUCTIONS, TOOL_DESCRIPTION, calculate

TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": TOOL_DESCRIPTION,
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


def solve(client: openai.OpenAI, question: str) -> str:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": question},
    ]
    for _ in range(4):
        reply = client.chat.completions.create(model="scripted", messages=messages, tools=[TOOL]).choices[0].message
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            return reply.content or ""
        for call in reply.tool_calls:
            expression = json.loads(call.function.arguments).get("expression", "")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": calculate(str(expression))})
    return ""


def main() -> None:
    client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ.get("LLM_API_KEY", "not-needed"))
    for question in sys.argv[1:] or DEFAULT_QUESTIONS:
        print(json.dumps({"question": question, "answer": solve(client, question)}), flush=True)


if __name__ == "__main__":
    main()
