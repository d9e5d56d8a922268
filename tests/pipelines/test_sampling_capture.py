"""How a call was sampled, and by which weights, reaches the transition from real captured spans: a plain
OpenAI-SDK agent under Traceloop's instrumentation and tracelearn's token-id hook, against the embedded
model server (tiny random model), its spans written by the capture path's own writer and built."""

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import openai
import polars as pl
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.instrumentors import traceloop_openai
from support.spans_factory import SpansFactory
from support.tiny_model import build_tiny_model

from tracelearn.collector.span_rows import from_readable_span
from tracelearn.instrumentation.token_ids import TokenIdsInstrumentor
from tracelearn.models import load_model, resolve_model
from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.schemas import semconv as sc
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationEngine]:
    model = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat-model")
    running = GenerationEngine(load_model(resolve_model(str(model)), device="cpu"))
    yield running
    running.close()


@pytest.mark.slow
def test_temperature_top_p_and_the_model_version_reach_the_transitions(engine: GenerationEngine,
                                                                       tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with BackgroundServer(create_app(engine, served_model_name="tiny")) as server, traceloop_openai(provider):
        TokenIdsInstrumentor().instrument(tracer_provider=provider)
        try:
            client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            for task, (temperature, top_p) in enumerate([(0.7, 0.9), (1.0, None)]):
                sampling = {"temperature": temperature} | ({"top_p": top_p} if top_p is not None else {})
                with provider.get_tracer("agent").start_as_current_span("agent.run") as root:
                    root.set_attribute(sc.TASK_ID, f"t{task}")
                    client.chat.completions.create(model="tiny", max_tokens=6, **sampling,  # type: ignore[call-overload]
                                                   messages=[{"role": "user", "content": f"What is {task} plus 4?"}])
        finally:
            TokenIdsInstrumentor().uninstrument()
    (call, _) = [span for span in exporter.get_finished_spans() if span.name == "openai.chat"]
    # The hook records the response's system_fingerprint (the server's model version) on the LLM span.
    assert (call.attributes or {})[sc.OPENAI_RESPONSE_SYSTEM_FINGERPRINT] == engine.model_version

    factory = SpansFactory(tmp_path / "data" / "spans")
    factory.records = [from_readable_span(span) for span in exporter.get_finished_spans()]
    factory.write()
    config = parse_config({"reward": {"missing": "fill", "fill_value": 0.0}})
    result = build_transitions(tmp_path / "data", tmp_path / "out", config,
                               now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))

    transitions = pl.concat([pl.read_parquet(path) for path in result.transitions_files]).sort("task_id")
    assert transitions.select("task_id", "temperature", "top_p", "model_version", "token_ids_source").rows() == [
        ("t0", 0.7, 0.9, engine.model_version, "server"),
        ("t1", 1.0, None, engine.model_version, "server"),
    ]
