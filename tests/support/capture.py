"""The real capture stack (SDK provider, our processors, the Parquet exporter), installed globally.

OpenTelemetry lets a process set its global tracer provider once; tests reset that guard the way
OpenTelemetry's own test utilities do, so each test gets a fresh provider writing to its own directory.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util._once import Once

from tracelearn.collector.settings import CaptureSettings
from tracelearn.collector.span_exporter import ParquetSpanExporter
from tracelearn.instrumentation.span_processors import DurableBatchSpanProcessor, RolloutContextSpanProcessor


def reset_global_tracer_provider() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


def capture_settings(data: Path, **overrides: object) -> CaptureSettings:
    env = {"TRACELEARN_DATA": str(data)}
    env.update({key: str(value) for key, value in overrides.items()})
    return CaptureSettings.from_env(env)


@contextmanager
def installed_capture(
    data: Path, service: str = "test-agent", **settings: object
) -> Iterator[tuple[TracerProvider, DurableBatchSpanProcessor, ParquetSpanExporter]]:
    """Install provider + processors + exporter globally; shut down (flushing) on exit."""
    reset_global_tracer_provider()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = ParquetSpanExporter(capture_settings(data, **settings))
    processor = DurableBatchSpanProcessor(exporter)
    provider.add_span_processor(RolloutContextSpanProcessor())
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    try:
        yield provider, processor, exporter
    finally:
        provider.shutdown()
        reset_global_tracer_provider()
