"""Traceloop's instrumentors, installed for one test and removed completely afterwards.

Traceloop 0.62.4's ``uninstrument()`` calls OpenTelemetry's ``unwrap("module", "Class.method")``,
which expects ``unwrap("module.Class", "method")``: nothing is unwrapped, and the next
``instrument()`` stacks a second wrapper whose tracer still belongs to the previous test's provider.
``remove_wrappers`` takes off what an instrumentation package left on the classes it patched.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import wrapt
from opentelemetry.sdk.trace import TracerProvider


def remove_wrappers(wrapper_package: str, module_prefix: str) -> None:
    """Unwrap every method of classes in ``module_prefix*`` modules wrapped by ``wrapper_package``."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(module_prefix):
            continue
        for owner in list(vars(module).values()):
            if not isinstance(owner, type) or owner.__module__ != name:
                continue
            for attribute, value in list(vars(owner).items()):
                while isinstance(value, wrapt.FunctionWrapper) and str(
                    getattr(value._self_wrapper, "__module__", "")
                ).startswith(wrapper_package):
                    value = value.__wrapped__
                    setattr(owner, attribute, value)


@contextmanager
def traceloop_openai(provider: TracerProvider) -> Iterator[None]:
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor

    OpenAIInstrumentor().instrument(tracer_provider=provider)
    try:
        yield
    finally:
        OpenAIInstrumentor().uninstrument()
        remove_wrappers("opentelemetry.instrumentation.openai", "openai")


@contextmanager
def traceloop_langchain(provider: TracerProvider) -> Iterator[None]:
    from opentelemetry.instrumentation.langchain import LangchainInstrumentor

    LangchainInstrumentor().instrument(tracer_provider=provider)
    try:
        yield
    finally:
        LangchainInstrumentor().uninstrument()
        remove_wrappers("opentelemetry.instrumentation.langchain", "langchain")
