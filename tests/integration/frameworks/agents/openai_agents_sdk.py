"""An OpenAI Agents SDK agent with one tool, on the Chat Completions model pointed at OPENAI_BASE_URL.

The SDK's own tracing is not OpenTelemetry; its default processor would post traces to OpenAI's
backend, which it skips when no OpenAI key is set (the key the model client uses is passed to it
directly, as ``LLM_API_KEY``), so only the instrumentations' processors see the run.

    python openai_agents_sdk.py [QUESTION...]
"""

import json
import os
import sys

from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool
from calculator import AGENT_NAME, DEFAULT_QUESTIONS, INSTRUCTIONS, calculate
from openai import AsyncOpenAI


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 12 + 30."""
    return calculate(expression)


def main() -> None:
    client = AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ.get("LLM_API_KEY", "not-needed"))
    agent = Agent(
        name=AGENT_NAME,
        instructions=INSTRUCTIONS,
        tools=[calculator],
        model=OpenAIChatCompletionsModel(model="scripted", openai_client=client),
    )
    for question in sys.argv[1:] or DEFAULT_QUESTIONS:
        result = Runner.run_sync(agent, question, max_turns=4)
        print(json.dumps({"question": question, "answer": str(result.final_output)}), flush=True)


if __name__ == "__main__":
    main()
