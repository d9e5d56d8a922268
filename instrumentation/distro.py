"""The OpenTelemetry distro and configurator that ``opentelemetry-instrument`` loads.

Without a configurator the global tracer provider stays a proxy and nothing is exported, so we ship
our own: it builds the SDK exactly as OTel's does, but with ``RolloutContextSpanProcessor`` first and
``DurableBatchSpanProcessor`` (no silent drops) in front of every exporter, ours or OTLP. The distro
makes ``tracelearn`` the default traces exporter, turns metrics and logs exporters off unless the
user chose them, and asks the official GenAI instrumentations to put message content on spans.
"""

import logging
import os
from typing import Any

from opentelemetry.environment_variables import (
    OTEL_LOGS_EXPORTER,
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)

# The instrumentation package ships no type information for its distro module.
from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]
from opentelemetry.sdk._configuration import _OTelSDKConfigurator

from tracelearn.instrumentation.span_processors import DurableBatchSpanProcessor, RolloutContextSpanProcessor

logger = logging.getLogger(__name__)


# The official GenAI instrumentations (opentelemetry-instrumentation-openai-v2 and the others built
# on opentelemetry-util-genai) record message content only when asked, and by default as log events,
# which tracelearn does not capture: these settings put it on the LLM span, where every other
# convention has it. Older util-genai versions also need the stability opt-in.
GENAI_CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
GENAI_CONTENT_ON_SPANS = "SPAN_ONLY"
SEMCONV_STABILITY_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
GENAI_LATEST_EXPERIMENTAL = "gen_ai_latest_experimental"


def with_genai_opt_in(opt_in: str) -> str:
    """``OTEL_SEMCONV_STABILITY_OPT_IN`` with the GenAI opt-in added, unless it names a gen_ai mode already."""
    modes = [mode.strip() for mode in opt_in.split(",") if mode.strip()]
    if any(mode.startswith("gen_ai") for mode in modes):
        return opt_in
    return ",".join([*modes, GENAI_LATEST_EXPERIMENTAL])


class TracelearnDistro(BaseDistro):  # type: ignore[misc]
    """Defaults: traces to the tracelearn Parquet exporter; metrics and logs off; GenAI content on spans."""

    def _configure(self, **kwargs: Any) -> None:
        os.environ.setdefault(OTEL_TRACES_EXPORTER, "tracelearn")
        os.environ.setdefault(OTEL_METRICS_EXPORTER, "none")
        os.environ.setdefault(OTEL_LOGS_EXPORTER, "none")
        os.environ.setdefault(GENAI_CAPTURE_CONTENT, GENAI_CONTENT_ON_SPANS)
        os.environ[SEMCONV_STABILITY_OPT_IN] = with_genai_opt_in(os.environ.get(SEMCONV_STABILITY_OPT_IN, ""))


class TracelearnConfigurator(_OTelSDKConfigurator):
    """OTel's SDK configurator with our span processors."""

    def _configure(self, **kwargs: Any) -> None:
        if "tracelearn" in os.environ.get(OTEL_TRACES_EXPORTER, ""):
            # Validate our settings up front: one clear line instead of a traceback from deep inside
            # the SDK. The agent then runs without capture rather than not at all.
            from tracelearn.settings import SettingError
            from tracelearn.settings.variables import CAPTURE

            try:
                for setting in CAPTURE:
                    setting.value()
            except SettingError as exc:
                logger.error("tracelearn: capture is off for this process: %s", exc)
                return
        kwargs.setdefault("span_processors", [RolloutContextSpanProcessor()])
        kwargs.setdefault("export_span_processor", DurableBatchSpanProcessor)
        super()._configure(**kwargs)  # type: ignore[no-untyped-call]
