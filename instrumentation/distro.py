"""The OpenTelemetry distro and configurator that ``opentelemetry-instrument`` loads.

Without a configurator the global tracer provider stays a proxy and nothing is exported, so we ship
our own: it builds the SDK exactly as OTel's does, but with ``RolloutContextSpanProcessor`` first and
``DurableBatchSpanProcessor`` (no silent drops) in front of every exporter, ours or OTLP. The distro
makes ``tracelearn`` the default traces exporter and turns metrics and logs exporters off unless the
user chose them.
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


class TracelearnDistro(BaseDistro):  # type: ignore[misc]
    """Defaults: traces to the tracelearn Parquet exporter; metrics and logs off."""

    def _configure(self, **kwargs: Any) -> None:
        os.environ.setdefault(OTEL_TRACES_EXPORTER, "tracelearn")
        os.environ.setdefault(OTEL_METRICS_EXPORTER, "none")
        os.environ.setdefault(OTEL_LOGS_EXPORTER, "none")


class TracelearnConfigurator(_OTelSDKConfigurator):
    """OTel's SDK configurator with our span processors."""

    def _configure(self, **kwargs: Any) -> None:
        if "tracelearn" in os.environ.get(OTEL_TRACES_EXPORTER, ""):
            # Validate our settings up front: one clear line instead of a traceback from deep inside
            # the SDK. The agent then runs without capture rather than not at all.
            from tracelearn.collector.settings import CaptureSettings, SettingsError

            try:
                CaptureSettings.from_env()
            except SettingsError as exc:
                logger.error("tracelearn: capture is off for this process: %s", exc)
                return
        kwargs.setdefault("span_processors", [RolloutContextSpanProcessor()])
        kwargs.setdefault("export_span_processor", DurableBatchSpanProcessor)
        super()._configure(**kwargs)  # type: ignore[no-untyped-call]
