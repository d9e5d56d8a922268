"""One log line, once per process, when an LLM call goes out with no LLM instrumentation around it.

The token-id hook (``token_ids``) sees every chat completion an ``httpx`` client sends; when no LLM
instrumentation's span is current, the call's messages, model and usage are not captured (only its
token ids are, on a ``tracelearn.token_ids`` span). The first time that happens,
``advise_llm_instrumentation`` says which package would capture it: for the ``openai`` SDK (known by
its User-Agent) Traceloop's ``opentelemetry-instrumentation-openai``, which comes with tracelearn,
and whether it is missing, disabled by ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` or not running
under ``opentelemetry-instrument``; for a framework with code on the call stack, its own
instrumentation (a small table of packages that exist and record that framework's LLM calls).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import threading
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry.instrumentation.environment_variables import OTEL_PYTHON_DISABLED_INSTRUMENTATIONS

from tracelearn.schemas import semconv as sc

# Traceloop's LangChain handler sets this context key while it owns an LLM call's span (not current).
_TRACELOOP_LLM_SUPPRESSION_KEY: Final = "suppress_language_model_instrumentation"
# Frameworks with LLM spans of their own, by top-level package, and what records them (said, once, of
# the framework found on the call stack of a chat completion sent with no LLM span around it).
_FRAMEWORK_INSTRUMENTATIONS: Final = {
    "langchain_core": ("LangChain", "opentelemetry-instrumentation-langchain (tracelearn[instrumentations])"),
    "langchain_openai": ("LangChain", "opentelemetry-instrumentation-langchain (tracelearn[instrumentations])"),
    "crewai": ("CrewAI", "opentelemetry-instrumentation-crewai"),
    "litellm": ("LiteLLM", "openinference-instrumentation-litellm"),
    "smolagents": ("smolagents", "openinference-instrumentation-smolagents"),
    "pydantic_ai": ("Pydantic AI", "its own, turned on by pydantic_ai.Agent.instrument_all()"),
}

_log = logging.getLogger(__name__)
_advice_lock = threading.Lock()
_advised = threading.Event()  # set once per process (cleared by uninstrument)


def advise_llm_instrumentation(server: str, user_agent: str) -> None:
    """The first chat completion sent with no LLM span around it: one log line saying what to install."""
    if _advised.is_set() or otel_context.get_value(_TRACELOOP_LLM_SUPPRESSION_KEY):
        return
    with _advice_lock:
        if _advised.is_set():
            return
        _advised.set()
    steps = []
    if user_agent.startswith("OpenAI/"):  # the openai SDK's own User-Agent, e.g. "OpenAI/Python 3.63.0"
        disabled = os.environ.get(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS, "")
        if importlib.util.find_spec("opentelemetry.instrumentation.openai") is None:
            steps.append("pip install opentelemetry-instrumentation-openai (the openai SDK's instrumentation)")
        elif "openai" in [name.strip() for name in disabled.split(",")]:
            steps.append(
                "the openai SDK's instrumentation (opentelemetry-instrumentation-openai) is installed but "
                f"disabled by OTEL_PYTHON_DISABLED_INSTRUMENTATIONS={disabled}: take 'openai' out of it"
            )
        else:
            steps.append(
                "the openai SDK's instrumentation (opentelemetry-instrumentation-openai, installed with "
                "tracelearn) is not active: run the agent under opentelemetry-instrument, and keep 'openai' "
                "out of OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"
            )
    steps += [f"it came from {name}, whose instrumentation is {what}" for name, what in _calling_frameworks()]
    if not steps:
        steps.append(
            f"instrument the client that sent it (User-Agent {user_agent!r}); the openai SDK's "
            "instrumentation is opentelemetry-instrumentation-openai"
        )
    _log.warning(
        "tracelearn: a chat completion went to %s with no LLM instrumentation around it, so its messages, "
        "model and usage are not captured (its token ids are, on a %s span). To capture them: %s.",
        server,
        sc.SPAN_TOKEN_IDS,
        "; ".join(steps),
    )


def _calling_frameworks() -> list[tuple[str, str]]:
    """The frameworks of ``_FRAMEWORK_INSTRUMENTATIONS`` with code on the current call stack, outermost last."""
    found: list[tuple[str, str]] = []
    frame = inspect.currentframe()
    while frame is not None:
        framework = _FRAMEWORK_INSTRUMENTATIONS.get(str(frame.f_globals.get("__name__", "")).partition(".")[0])
        if framework is not None and framework not in found:
            found.append(framework)
        frame = frame.f_back
    return found


def forget_advice() -> None:
    """Say it again the next time (``TokenIdsInstrumentor.uninstrument()``)."""
    _advised.clear()
