"""A smolagents ToolCallingAgent with one tool, on OpenAIServerModel pointed at OPENAI_BASE_URL.

smolagents sends tool calls and their results as text turns (``Calling tools: ...`` from the
assistant, ``Observation: ...`` from the user) and ends a run with a call to its ``final_answer`` tool.

    python smolagents_agent.py [QUESTION...]
"""

import json
import os
import sys

from calculator import AGENT_NAME, DEFAULT_QUESTIONS, INSTRUCTIONS, calculate
from smolagents import OpenAIServerModel, ToolCallingAgent, tool


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 12 + 30.

    Args:
        expression: the arithmetic to evaluate, e.g. 12 + 30
    """
    return calculate(expression)


def main() -> None:
    model = OpenAIServerModel(
        model_id="scripted", api_base=os.environ["OPENAI_BASE_URL"], api_key=os.environ.get("LLM_API_KEY", "not-needed")
    )
    agent = ToolCallingAgent(tools=[calculator], model=model, name=AGENT_NAME, instructions=INSTRUCTIONS,
                             max_steps=4, verbosity_level=0)
    for question in sys.argv[1:] or DEFAULT_QUESTIONS:
        answer = agent.run(question)
        print(json.dumps({"question": question, "answer": str(answer)}), flush=True)


if __name__ == "__main__":
    main()
