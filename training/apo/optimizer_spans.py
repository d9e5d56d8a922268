"""The optimizer's own calls as spans: a private tracer provider writing a tracelearn spans dataset.

APO's optimizer calls are traced like any agent's, into ``<out>/optimizer-spans`` (read it with
``tracelearn spans stats <out>/optimizer-spans``): one root span ``apo.propose`` per proposed edit,
with one LLM span per call under it (``chat <model>``, the GenAI attributes the collector reads:
operation, models, usage tokens, input and output messages). The provider is private, not the
global one, so another library's spans never land in this dataset and
this dataset never receives theirs.

May import: opentelemetry-sdk, tracelearn.collector (the Parquet exporter), tracelearn.instrumentation
(the durable batch processor).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_exporter import ParquetSpanExporter
from tracelearn.instrumentation.span_processors import DurableBatchSpanProcessor
from tracelearn.schemas import messages as mc
from tracelearn.schemas import semconv as sc

__all__ = ["SERVICE_NAME", "OptimizerSpans", "llm_call_attributes"]

SERVICE_NAME = "tracelearn-apo-optimizer"


class OptimizerSpans:
    """A tracer whose spans land under ``directory/spans/``; :meth:`close` flushes them to Parquet."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        settings = CaptureSettings.from_env({**os.environ, "TRACELEARN_DATA": str(directory)})
        self._provider = TracerProvider(resource=Resource.create({sc.SERVICE_NAME: SERVICE_NAME}))
        self._provider.add_span_processor(DurableBatchSpanProcessor(ParquetSpanExporter(settings)))
        self.tracer: Tracer = self._provider.get_tracer("tracelearn.training.apo")

    def close(self) -> None:
        self._provider.shutdown()


def _with_finish_reason(reply: str, finish_reason: str | None) -> dict[str, Any]:
    message = mc.openai_message_to_parts({"role": "assistant", "content": reply})
    if finish_reason is not None:
        message["finish_reason"] = finish_reason
    return message


def llm_call_attributes(model: str, messages: Sequence[Mapping[str, str]], reply: str, finish_reason: str | None,
                        response_model: str | None, prompt_tokens: int | None,
                        completion_tokens: int | None) -> dict[str, Any]:
    """The GenAI attributes of one chat call (messages in the GenAI parts form)."""
    attributes: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: "openai",
        sc.GEN_AI_REQUEST_MODEL: model,
        sc.GEN_AI_INPUT_MESSAGES: mc.compact_json(mc.openai_messages_to_parts(list(messages))),
        sc.GEN_AI_OUTPUT_MESSAGES: mc.compact_json([_with_finish_reason(reply, finish_reason)]),
    }
    if response_model:
        attributes[sc.GEN_AI_RESPONSE_MODEL] = response_model
    if prompt_tokens is not None:
        attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = prompt_tokens
    if completion_tokens is not None:
        attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = completion_tokens
    return attributes
