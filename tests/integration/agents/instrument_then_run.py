"""Instrument the named instrumentations in the order given, then run an agent script as ``__main__``.

    opentelemetry-instrument python instrument_then_run.py openinference,traceloop,token_ids AGENT.py [ARGS...]

For tests that need a known order: run it with ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` naming what
it instruments itself (``openai``, the entry-point name both Traceloop's and OpenInference's OpenAI
instrumentors register, and ``tracelearn_token_ids``), so that ``opentelemetry-instrument`` only sets up
tracelearn's distro and exporter. Every instrumentor gets the global tracer provider it configured.
"""

import runpy
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace


def instrumentor(name: str) -> Any:
    if name == "traceloop":
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        return OpenAIInstrumentor()
    if name == "openinference":
        from openinference.instrumentation.openai import OpenAIInstrumentor as OpenInferenceOpenAIInstrumentor

        return OpenInferenceOpenAIInstrumentor()
    if name == "token_ids":
        from tracelearn.instrumentation.token_ids import TokenIdsInstrumentor

        return TokenIdsInstrumentor()
    raise SystemExit(f"unknown instrumentation {name!r}: use traceloop, openinference or token_ids")


def main() -> None:
    order, agent, *argv = sys.argv[1:]
    for name in filter(None, order.split(",")):
        instrumentor(name).instrument(tracer_provider=trace.get_tracer_provider())
    sys.argv = [agent, *argv]
    sys.path.insert(0, str(Path(agent).resolve().parent))  # as `python AGENT.py` would: its own imports
    runpy.run_path(agent, run_name="__main__")


if __name__ == "__main__":
    main()
