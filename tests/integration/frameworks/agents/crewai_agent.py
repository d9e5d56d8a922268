"""A CrewAI crew of one agent with one tool, on CrewAI's OpenAI provider pointed at OPENAI_BASE_URL.

CrewAI's anonymous telemetry and its trace upload are switched off (they would leave the machine).

    python crewai_agent.py [QUESTION...]
"""

import json
import os
import sys

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED_CREWAI", "true")

from calculator import DEFAULT_QUESTIONS, INSTRUCTIONS, calculate
from crewai import LLM, Agent, Crew, Task
from crewai.tools import tool

ROLE = "Calculator"


@tool("calculator")
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 12 + 30."""
    return calculate(expression)


def main() -> None:
    llm = LLM(model="openai/scripted", base_url=os.environ["OPENAI_BASE_URL"],
              api_key=os.environ.get("LLM_API_KEY", "not-needed"))
    agent = Agent(role=ROLE, goal=INSTRUCTIONS, backstory="You do arithmetic with a calculator.", tools=[calculator],
                  llm=llm, max_iter=4, verbose=False)
    for question in sys.argv[1:] or DEFAULT_QUESTIONS:
        task = Task(description=question, expected_output="the number only", agent=agent)
        result = Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
        print(json.dumps({"question": question, "answer": str(result.raw)}), flush=True)


if __name__ == "__main__":
    main()
