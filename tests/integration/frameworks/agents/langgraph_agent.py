"""A LangGraph tool agent (LangChain's ``create_agent``: a model node and a tools node in a graph)
on ChatOpenAI pointed at OPENAI_BASE_URL.

    python langgraph_agent.py [QUESTION...]
"""

import json
import os
import sys

from calculator import AGENT_NAME, DEFAULT_QUESTIONS, INSTRUCTIONS, calculate
from langchain.agents import create_agent
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 12 + 30."""
    return calculate(expression)


def main() -> None:
    model = ChatOpenAI(model="scripted", base_url=os.environ["OPENAI_BASE_URL"],
                       api_key=os.environ.get("LLM_API_KEY", "not-needed"))
    graph = create_agent(model, tools=[calculator], system_prompt=INSTRUCTIONS, name=AGENT_NAME)
    for question in sys.argv[1:] or DEFAULT_QUESTIONS:
        state = graph.invoke({"messages": [{"role": "user", "content": question}]})
        print(json.dumps({"question": question, "answer": str(state["messages"][-1].content)}), flush=True)


if __name__ == "__main__":
    main()
