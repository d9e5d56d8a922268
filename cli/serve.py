"""``tracelearn serve``: the embedded OpenAI-compatible model server, or vLLM on a GPU machine.

``--model registry:NAME@ALIAS`` serves the registry version the alias names and follows the alias:
when it moves, the new version is loaded in the background and swapped in without failing requests
(``tracelearn.serving.alias_follower``). ``--engine vllm`` launches vLLM's OpenAI server instead
(``tracelearn.serving.vllm_server``): token ids and logprobs on, a LoRA version hot-loaded, a full
version by restart.

torch, transformers and uvicorn are imported inside the command, so ``tracelearn --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from tracelearn.registry import Registry
    from tracelearn.serving.engine_slot import EngineSlot


@click.command()
@click.option("--model", "model_name", default="smollm2", show_default=True,
              help="'smollm2' (the cached default), a Hugging Face model directory, a LoRA adapter directory, "
                   "a .gguf file, a hub id already in the local Hugging Face cache, or registry:NAME@ALIAS "
                   "(followed: a moved alias is hot-swapped in).")
@click.option("--registry", "registry_location", default=None,
              help="Registry of registry: models and of LoRA bases named by registry: references "
                   "(default: $TRACELEARN_REGISTRY or ~/.cache/tracelearn/registry).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Most requests decoded together in one forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--served-model-name", default=None,
              help="Model name in the API (default: the model's own name, e.g. SmolLM2-135M-Instruct).")
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="Cap the context length below the model's own limit.")
@click.option("--watch-interval", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds between checks of a registry:NAME@ALIAS model's alias.")
@click.option("--engine", type=click.Choice(["embedded", "vllm"]), default="embedded", show_default=True,
              help="embedded: transformers in this process (CPU or CUDA); vllm: launch vLLM (CUDA, tracelearn[gpu]).")
@click.option("--prefix-cache-mb", default=512, show_default=True, type=click.IntRange(min=0),
              help="Memory for the key/value cache of earlier prompts and replies (a conversation's next turn "
                   "prefills only what is new); 0 turns it off.")
@click.option("--default-max-tokens", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Completion budget of a request that sets no max_tokens (capped by the context left).")
@click.option("--max-request-tokens", default=16384, show_default=True, type=click.IntRange(min=1),
              help="Most tokens one request's n choices may generate together (n x max_tokens; 400 beyond).")
@click.option("--max-body-mb", default=8.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body accepted (413 beyond).")
@click.option("--max-queued", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most requests waiting for the model (read, not yet decoding; running ones are bounded by "
                   "--max-batch-size): beyond it a request is answered 429 with Retry-After at once, before its "
                   "prompt is tokenized. Embedded engine only.")
@click.option("--max-queued-tokens", default=None, type=click.IntRange(min=1),
              help="Most completion tokens the waiting requests may generate together (n x max_tokens each; 429 "
                   "beyond). Default: no bound beyond --max-queued x --max-request-tokens. Embedded engine only.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch's intra-op threads for generation (default: torch's own, one per core). On a shared "
                   "machine, set it to keep the server off the cores other work needs. Embedded engine only.")
def serve(
    engine: str,
    model_name: str,
    registry_location: str | None,
    host: str,
    port: int,
    max_batch_size: int,
    device: str,
    served_model_name: str | None,
    max_model_len: int | None,
    watch_interval: float,
    prefix_cache_mb: int,
    default_max_tokens: int,
    max_request_tokens: int,
    max_body_mb: float,
    max_queued: int,
    max_queued_tokens: int | None,
    threads: int | None,
) -> None:
    """Serve a model over the OpenAI chat-completions API (token ids and logprobs included).

    Requests waiting for the model are bounded (--max-queued; 429 with Retry-After beyond), and
    --threads bounds the cores torch uses; /health reports both (queue, torch_threads).
    """
    from tracelearn.registry import RegistryError, open_registry

    try:
        registry = open_registry(registry_location) if registry_location else None
    except RegistryError as error:
        raise click.ClickException(str(error)) from error
    if engine == "vllm":
        if threads is not None:
            raise click.ClickException("--threads sets the embedded engine's torch threads; vLLM sizes its own")
        _serve_with_vllm(model_name, registry, host, port, served_model_name, max_model_len, watch_interval)
        return
    import torch

    from tracelearn.models import REGISTRY_PREFIX
    from tracelearn.serving.engine_queue import AdmissionQueue
    from tracelearn.serving.http_server import BackgroundServer
    from tracelearn.serving.openai_api import create_app
    from tracelearn.serving.protocol import ServingLimits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)  # process-wide: the generation worker and every model load
    started = time.perf_counter()
    if model_name.startswith(REGISTRY_PREFIX):
        slot, aliases, stop_following = _follow_registry_model(model_name, registry, device, max_model_len,
                                                               max_batch_size, watch_interval, prefix_cache_mb << 20)
        served = served_model_name or slot.following or model_name
    else:
        slot, aliases = _load_model(model_name, registry, device, max_model_len, max_batch_size,
                                    prefix_cache_mb << 20)
        served, stop_following = served_model_name or slot.current.model_id, None
    click.echo(f"loaded {slot.current.model_version} in {time.perf_counter() - started:.1f} s "
               f"(context {slot.current.context_length} tokens; torch intra-op threads: {torch.get_num_threads()})")
    limits = ServingLimits(max_body_bytes=int(max_body_mb * 2**20), default_max_tokens=default_max_tokens,
                           max_request_tokens=max_request_tokens)
    admission = AdmissionQueue(max_queued, max_queued_tokens)
    server = BackgroundServer(create_app(slot, served, aliases, limits, admission), host=host, port=port)
    try:
        server.start()
    except RuntimeError as error:
        if stop_following is not None:
            stop_following()
        slot.close()
        raise click.ClickException(f"{error} (is the port in use?)") from error
    click.echo(f"serving {served} on {server.base_url}  (Ctrl-C to stop)")

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop.wait(0.5):
        pass
    click.echo("shutting down ...")
    if stop_following is not None:
        stop_following()
    server.stop()
    slot.close()


def _load_model(
    model_name: str, registry: Registry | None, device: str, max_model_len: int | None, max_batch_size: int,
    prefix_cache_bytes: int,
) -> tuple[EngineSlot, set[str]]:
    """A slot holding one engine for a model that is served as loaded, and the names it answers to."""
    from tracelearn.models import (
        DEFAULT_MODEL_ALIASES,
        DEFAULT_MODEL_NAME,
        ModelLoadError,
        ModelNotFoundError,
        is_default_model_name,
        load_model,
        resolve_model,
    )
    from tracelearn.registry import RegistryError
    from tracelearn.serving.engine import GenerationEngine
    from tracelearn.serving.engine_slot import EngineSlot

    try:
        source = resolve_model(model_name, registry=registry)
    except (ModelNotFoundError, RegistryError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"loading {source.model_id} from {source.directory} (device: {device}) ...")
    try:
        loaded = load_model(source, device=device, max_model_len=max_model_len)
    except (ModelNotFoundError, ModelLoadError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    aliases = {model_name}
    if is_default_model_name(model_name):
        aliases |= {*DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_NAME}
    engine = GenerationEngine(loaded, max_batch_size=max_batch_size, prefix_cache_bytes=prefix_cache_bytes)
    return EngineSlot(engine), aliases


def _follow_registry_model(
    model_name: str, registry: Registry | None, device: str, max_model_len: int | None, max_batch_size: int,
    watch_interval: float, prefix_cache_bytes: int,
) -> tuple[EngineSlot, set[str], Callable[[], None]]:
    """A slot serving what a registry alias names, kept current by a started ``AliasFollower``; the
    names it answers to; and the function that stops following.
    """
    from tracelearn.models import ModelLoadError, ModelNotFoundError
    from tracelearn.registry import RegistryError
    from tracelearn.serving.alias_follower import AliasFollower
    from tracelearn.serving.engine import GenerationEngine

    click.echo(f"loading {model_name} (device: {device}; the alias is checked every {watch_interval:g} s) ...")
    try:
        follower = AliasFollower(
            model_name,
            registry=registry,
            interval_s=watch_interval,
            device=device,
            max_model_len=max_model_len,
            make_engine=lambda loaded: GenerationEngine(loaded, max_batch_size=max_batch_size,
                                                        prefix_cache_bytes=prefix_cache_bytes),
        )
    except (RegistryError, ModelNotFoundError, ModelLoadError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    follower.start()
    # Clients may name the model as given, as the reference, or by its artifact name.
    aliases = {model_name, str(follower.ref), follower.ref.name}
    return follower.slot, aliases, follower.stop


def _serve_with_vllm(model_name: str, registry: Registry | None, host: str, port: int, served_model_name: str | None,
                     max_model_len: int | None, watch_interval: float) -> None:
    from tracelearn.registry import RegistryError
    from tracelearn.serving.vllm_server import VllmNotInstalledError, serve_with_vllm

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        code = serve_with_vllm(model_name, host, port, served_model_name=served_model_name, registry=registry,
                               max_model_len=max_model_len, poll_seconds=watch_interval, stop=stop)
    except (VllmNotInstalledError, RegistryError, FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    if code not in (0, None) and not stop.is_set():
        raise click.ClickException(f"vLLM exited with code {code}")
