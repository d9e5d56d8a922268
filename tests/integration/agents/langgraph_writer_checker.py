"""A two-role LangGraph agent (writer drafts, checker reviews) that knows nothing of tracelearn.

Run under ``opentelemetry-instrument`` by the framework tests: ``python langgraph_writer_checker.py
QUESTION...`` against ``OPENAI_BASE_URL``.
"""

import sys
from typing import TypedDict

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph


class Draft(TypedDict, total=False):
    question: str
    draft: str
    verdict: str


llm = ChatOpenAI(model="scripted", temperature=0, max_tokens=64)


def writer(state: Draft) -> Draft:
    reply = llm.invoke([SystemMessage("You answer briefly."), HumanMessage(state["question"])])
    return {"draft": str(reply.content)}


def checker(state: Draft) -> Draft:
    reply = llm.invoke([SystemMessage("Reply OK if the answer is right."), HumanMessage(state["draft"])])
    return {"verdict": str(reply.content)}


graph = StateGraph(Draft)
graph.add_node("writer", writer)
graph.add_node("checker", checker)
graph.add_edge(START, "writer")
graph.add_edge("writer", "checker")
graph.add_edge("checker", END)
app = graph.compile()

for question in sys.argv[1:]:
    result = app.invoke({"question": question})
    print(result["draft"], "|", result["verdict"])
