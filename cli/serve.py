"""``tracelearn serve``: the embedded OpenAI-compatible model server.

torch, transformers and uvicorn are imported inside the command, so ``tracelearn --help`` stays fast.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import click


@click.command()
@click.option("--model", "model_name", default="smollm2", show_default=True,
              help="'smollm2' (the cached default), a Hugging Face model directory, a .gguf file, "
                   "or a hub id already in the local Hugging Face cache.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Most requests decoded together in one forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--served-model-name", default=None,
              help="Model name in the API (default: the model's own name, e.g. SmolLM2-135M-Instruct).")
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="Cap the context length below the model's own limit.")
def serve(
    model_name: str,
    host: str,
    port: int,
    max_batch_size: int,
    device: str,
    served_model_name: str | None,
    max_model_len: int | None,
) -> None:
    """Serve a model over the OpenAI chat-completions API (token ids and logprobs included)."""
    from tracelearn.serving.engine import GenerationEngine
    from tracelearn.serving.http_server import BackgroundServer
    from tracelearn.serving.model_store import (
        DEFAULT_MODEL_ALIASES,
        DEFAULT_MODEL_NAME,
        ModelNotFoundError,
        is_default_model_name,
        load_model,
        resolve_model,
    )
    from tracelearn.serving.openai_api import create_app

    try:
        source = resolve_model(model_name)
    except ModelNotFoundError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"loading {source.model_id} from {source.directory} (device: {device}) ...")
    started = time.perf_counter()
    try:
        loaded = load_model(source, device=device, max_model_len=max_model_len)
    except (ModelNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"loaded {loaded.model_version} on {loaded.device} in {time.perf_counter() - started:.1f} s "
               f"(context {loaded.context_length} tokens)")
    aliases = {model_name}
    if is_default_model_name(model_name):
        aliases |= {*DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME}
    engine = GenerationEngine(loaded, max_batch_size=max_batch_size)
    server = BackgroundServer(create_app(engine, served_model_name, aliases), host=host, port=port)
    try:
        server.start()
    except RuntimeError as error:
        engine.close()
        raise click.ClickException(f"{error} (is the port in use?)") from error
    click.echo(f"serving {served_model_name or loaded.model_id} on {server.base_url}  (Ctrl-C to stop)")

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop.wait(0.5):
        pass
    click.echo("shutting down ...")
    server.stop()
    engine.close()
