"""``tracelearn gateway``: the OpenAI-compatible LLM gateway in front of one upstream model server.

fastapi, httpx and uvicorn are imported inside the command, so ``tracelearn --help`` stays fast.
Spans go through the global tracer provider: under ``opentelemetry-instrument`` it is the one that
command configured; run plainly, the command configures ours (``tracelearn`` Parquet exporter by
default, ``OTEL_TRACES_EXPORTER=otlp`` for OTLP) and flushes it at exit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import click


def ensure_span_export() -> Callable[[], None]:
    """Make sure spans are exported; returns what to call at exit to flush them."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        from tracelearn.instrumentation.distro import TracelearnConfigurator, TracelearnDistro

        TracelearnDistro().configure()
        TracelearnConfigurator().configure()  # type: ignore[no-untyped-call]
        provider = trace.get_tracer_provider()
    shutdown: Callable[[], Any] | None = getattr(provider, "shutdown", None)
    return (lambda: None) if shutdown is None else (lambda: shutdown())


@click.command()
@click.option("--upstream", required=True,
              help="OpenAI base URL of the model server, e.g. http://127.0.0.1:8000/v1 (/v1 is added when the "
                   "URL has no path).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token-ids", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Ask the upstream for token ids and logprobs: auto = only local/private upstreams.")
@click.option("--prompt-substitution", "prompt_substitutions", multiple=True, metavar="[MODEL=]PROMPT_REF",
              help="Replace the system message by a registry prompt, e.g. calc-system@production; with MODEL= only "
                   "for requests naming that model. Repeatable; the first matching rule wins.")
@click.option("--registry", "registry_location", default=None,
              help="Registry location for --prompt-substitution (default: $TRACELEARN_REGISTRY).")
@click.option("--prompt-poll-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="How often a substituted prompt's alias is checked for a move.")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for the upstream's answer.")
@click.option("--no-spans", is_flag=True,
              help="Record no spans (the agent's own instrumentation records each call; a second span per call "
                   "would be a rollout of its own). Substitution and /health's counts work as before.")
def gateway(
    upstream: str,
    host: str,
    port: int,
    token_ids: str,
    prompt_substitutions: tuple[str, ...],
    registry_location: str | None,
    prompt_poll_seconds: float,
    timeout_s: float,
    no_spans: bool,
) -> None:
    """Proxy an agent's OpenAI calls to UPSTREAM and record each as an LLM span with token ids."""
    from tracelearn.serving.gateway import create_gateway_app
    from tracelearn.serving.gateway_prompts import GatewayConfigError, PromptRule
    from tracelearn.serving.gateway_upstream import normalize_upstream
    from tracelearn.serving.http_server import BackgroundServer

    try:
        normalize_upstream(upstream)
        rules = [PromptRule.parse(text) for text in prompt_substitutions]
        registry = None
        if rules:
            from tracelearn.registry import open_registry

            registry = open_registry(registry_location)
        from opentelemetry.trace import NoOpTracerProvider, TracerProvider

        tracer_provider: TracerProvider | None = NoOpTracerProvider() if no_spans else None
        flush_spans: Callable[[], None] = (lambda: None) if no_spans else ensure_span_export()
        app = create_gateway_app(upstream, token_ids=token_ids, prompt_rules=rules, registry=registry,
                                 prompt_poll_seconds=prompt_poll_seconds, tracer_provider=tracer_provider,
                                 timeout_s=timeout_s)
    except GatewayConfigError as error:
        raise click.ClickException(str(error)) from error
    proxy = app.state.gateway
    server = BackgroundServer(app, host=host, port=port)
    try:
        server.start()
    except RuntimeError as error:
        proxy.close()
        raise click.ClickException(f"{error} (is the port in use?)") from error
    click.echo(f"gateway on {server.base_url} -> {proxy.upstream} (token ids: {token_ids})  (Ctrl-C to stop)")
    for source in proxy.prompt_sources:
        click.echo(f"  substituting {source.current.version.ref} ({source.rule.reference}) for "
                   f"{'every model' if source.rule.model is None else 'model ' + source.rule.model}")

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        click.echo("shutting down ...")
        server.stop()
        proxy.close()
        flush_spans()
