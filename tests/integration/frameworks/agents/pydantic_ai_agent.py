"""A Pydantic AI agent with one tool, on the OpenAI chat model pointed at OPENAI_BASE_URL.

``--native-otel`` turns on Pydantic AI's own OpenTelemetry spans (``Agent.instrument_all()``, which
writes to the global tracer provider ``opentelemetry-instrument`` set up). ``--openinference`` adds
OpenInference's span processor, which rewrites those spans into its convention (the way
openinference-instrumentation-pydantic-ai is used: it has no auto-instrumentor).

    python pydantic_ai_agent.py [--native-otel] [--openinference] [QUESTION...]
"""

import argparse
import json
import os

from calculator import AGENT_NAME, DEFAULT_QUESTIONS, INSTRUCTIONS, calculate
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 12 + 30."""
    return calculate(expression)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--native-otel", action="store_true")
    parser.add_argument("--openinference", action="store_true")
    parser.add_argument("questions", nargs="*")
    args = parser.parse_args()
    if args.openinference:
        from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
        from opentelemetry import trace

        trace.get_tracer_provider().add_span_processor(OpenInferenceSpanProcessor())  # type: ignore[attr-defined]
    if args.native_otel or args.openinference:
        Agent.instrument_all()
    api_key = os.environ.get("LLM_API_KEY", "not-needed")
    provider = OpenAIProvider(base_url=os.environ["OPENAI_BASE_URL"], api_key=api_key)
    agent = Agent(OpenAIChatModel("scripted", provider=provider), name=AGENT_NAME, instructions=INSTRUCTIONS,
                  tools=[calculator])
    for question in args.questions or DEFAULT_QUESTIONS:
        result = agent.run_sync(question)
        print(json.dumps({"question": question, "answer": str(result.output)}), flush=True)


if __name__ == "__main__":
    main()
