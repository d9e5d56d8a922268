"""Running vLLM's OpenAI-compatible server for a model directory or a registry version, and following an alias.

Owns: the command and environment of ``python -m vllm.entrypoints.openai.api_server`` (``vllm_command``)
with token ids and logprobs usable (``--max-logprobs``; token ids need nothing at launch: vLLM returns
them for requests carrying ``"return_token_ids": true``, which the gateway and the token-id
instrumentation add), LoRA adapters served by name on their base model (``--enable-lora
--max-lora-rank R --lora-modules NAME=PATH`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), the
server process (``VllmProcess``), and moving to a new version (``VllmFollower``): a LoRA version on
the same base is hot-loaded (``POST /v1/unload_lora_adapter`` of the old, ``POST
/v1/load_lora_adapter`` of the new, under the same served name, so agents keep their model name; the
name answers 404 for the moment between the two calls), anything else restarts the server.

Importable without vllm (only the launch checks for it). ``serve_with_vllm`` is the entry point of
``tracelearn serve --engine vllm``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx

from tracelearn.processes import ChildProcess, ChildProcessError, start_child

if TYPE_CHECKING:
    from tracelearn.registry import ArtifactVersion, Registry

VLLM_MISSING: Final = "vllm is not installed: pip install tracelearn[gpu] on a CUDA machine"
VLLM_MODULE: Final = "vllm.entrypoints.openai.api_server"
RUNTIME_LORA_ENV: Final = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
DEFAULT_MAX_LOGPROBS: Final = 20
ADAPTER_CONFIG: Final = "adapter_config.json"

_log = logging.getLogger(__name__)


class VllmNotInstalledError(RuntimeError):
    """vllm cannot be imported in this environment."""

    def __init__(self) -> None:
        super().__init__(VLLM_MISSING)


class VllmServerError(RuntimeError):
    """The vLLM server did not come up, exited, or refused an adapter change."""


def require_vllm() -> None:
    """Raise ``VllmNotInstalledError`` unless vllm is importable (checked without importing it: CUDA init is slow)."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmNotInstalledError()


# --- What to serve ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """One model as vLLM serves it: full weights (``adapter`` None) or a LoRA adapter on ``base_model``."""

    base_model: str  # a directory, a .gguf file or a hub id: vLLM's --model
    served_name: str  # the model name agents send
    adapter: Path | None = None
    lora_rank: int | None = None
    version_ref: str | None = None  # name@N when it came from the registry

    @property
    def is_lora(self) -> bool:
        return self.adapter is not None


def _adapter_rank(adapter: Path) -> int | None:
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and rank > 0 else None


def _adapter_base(adapter: Path) -> str:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise VllmServerError(f"{adapter / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    return base


def served_model_from_directory(directory: Path, served_name: str | None = None) -> ServedModel:
    """A local Hugging Face model directory, .gguf file, or peft LoRA adapter directory."""
    path = directory.expanduser().resolve()
    name = served_name or path.stem
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return ServedModel(_adapter_base(path), name, adapter=path, lora_rank=_adapter_rank(path))
    return ServedModel(str(path), name)


def served_model_from_version(
    registry: Registry, version: ArtifactVersion, served_name: str | None = None
) -> ServedModel:
    """A registry checkpoint version (its files fetched into the local cache, checksums verified)."""
    if version.kind != "checkpoint":
        raise VllmServerError(f"{version.ref} is a {version.kind}, not a checkpoint: vLLM serves checkpoints")
    local = registry.local_path(version)
    name = served_name or version.name
    if version.format == "lora":
        base = version.lineage.base_model or _adapter_base(local)
        return ServedModel(base, name, adapter=local, lora_rank=_adapter_rank(local), version_ref=version.ref)
    if version.format == "gguf":
        files = sorted(local.glob("*.gguf"))
        if not files:
            raise VllmServerError(f"{version.ref} is a gguf checkpoint without a .gguf file in {local}")
        return ServedModel(str(files[0]), name, version_ref=version.ref)
    return ServedModel(str(local), name, version_ref=version.ref)


# --- The command ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmSettings:
    """How to run vLLM. ``executable`` is what precedes the arguments (a stand-in in tests)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    max_lora_rank: int | None = None  # default: the adapter's own rank (r), else 64
    max_loras: int = 2  # the old and the new adapter can be resident together during a move
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: tuple[str, ...] = ()
    executable: tuple[str, ...] = (sys.executable, "-m", VLLM_MODULE)
    ready_timeout_s: float = 900.0  # large models take minutes to load and compile

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def _lora_rank(model: ServedModel, settings: VllmSettings) -> int:
    if settings.max_lora_rank is not None:
        return settings.max_lora_rank
    # vLLM accepts only some ranks (8, 16, 32, 64, ...): round the adapter's up to a power of two >= 8.
    rank = 8
    while rank < (model.lora_rank or 64):
        rank *= 2
    return rank


def vllm_command(model: ServedModel, settings: VllmSettings) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions that serve ``model`` with ``settings``."""
    base_name = f"{model.served_name}-base" if model.is_lora else model.served_name
    command = [
        *settings.executable,
        "--model", model.base_model,
        "--served-model-name", base_name,
        "--host", settings.host,
        "--port", str(settings.port),
        "--max-logprobs", str(settings.max_logprobs),
    ]
    env: dict[str, str] = {}
    if model.is_lora:
        command += [
            "--enable-lora",
            "--max-lora-rank", str(_lora_rank(model, settings)),
            "--max-loras", str(settings.max_loras),
            "--lora-modules", f"{model.served_name}={model.adapter}",
        ]
        # Runtime loading is what makes a LoRA move a hot-load instead of a restart.
        env[RUNTIME_LORA_ENV] = "True"
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    command += list(settings.extra_args)
    return command, env


# --- The process ------------------------------------------------------------------------------------


class VllmProcess:
    """One vLLM server process for the served model; ``restart`` replaces it with another model's."""

    def __init__(self, model: ServedModel, settings: VllmSettings) -> None:
        self.model = model
        self.settings = settings
        self.process: ChildProcess | None = None

    def start(self) -> VllmProcess:
        command, extra_env = vllm_command(self.model, self.settings)
        _log.info("starting vLLM: %s", " ".join(command))
        try:
            # vLLM's log goes on to this process's output, as it would if vLLM ran in the terminal.
            self.process = start_child(command, name="vLLM", env={**os.environ, **extra_env}, on_line=_echo)
        except ChildProcessError as error:
            raise VllmServerError(str(error)) from None
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Wait until ``GET /health`` answers 200; raise if the process exits or the timeout passes."""
        assert self.process is not None
        health = self.settings.base_url.removesuffix("/v1") + "/health"

        def healthy() -> bool | None:
            try:
                return True if httpx.get(health, timeout=2.0).status_code == 200 else None
            except httpx.TransportError:
                return None

        try:
            self.process.wait_until(healthy, self.settings.ready_timeout_s, f"{health} answered")
        except ChildProcessError as error:
            raise VllmServerError(str(error)) from None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None:
            self.process.stop(grace_s=timeout_s)

    def restart(self, model: ServedModel) -> None:
        self.stop()
        self.model = model
        self.start()

    def wait(self, stop: threading.Event | None = None) -> int:
        """Block until the process exits (or ``stop`` is set: then stop it); its exit code."""
        assert self.process is not None
        while self.process.returncode is None:
            if stop is not None and stop.wait(0.5):
                self.stop()
                break
            if stop is None:
                time.sleep(0.5)
        return self.process.wait()


def _echo(line: str) -> None:
    print(line, flush=True)


class LoraAdapters:
    """vLLM's runtime LoRA endpoints (needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)."""

    def __init__(self, base_url: str, timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _post(self, path: str, body: Mapping[str, str]) -> None:
        response = httpx.post(f"{self.base_url}/{path}", json=dict(body), timeout=self.timeout_s)
        if response.status_code >= 400:
            raise VllmServerError(
                f"vLLM refused {path} {dict(body)}: HTTP {response.status_code} {response.text[:500]}"
            )

    def load(self, name: str, path: Path) -> None:
        self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload(self, name: str) -> None:
        self._post("unload_lora_adapter", {"lora_name": name})


# --- Following an alias -----------------------------------------------------------------------------


@dataclass
class VllmFollower:
    """Polls a registry reference (``name@production``) and moves the server to the version it names.

    A LoRA version onto a LoRA version of the same base is hot-loaded; any other move restarts the
    process. A failed move is logged and retried at the next poll; the server keeps what it had.
    """

    registry: Registry
    reference: str
    server: VllmProcess
    poll_seconds: float = 10.0
    adapters: LoraAdapters | None = None
    moves: list[str] = field(default_factory=list)  # version refs applied, in order

    def __post_init__(self) -> None:
        if self.adapters is None:
            self.adapters = LoraAdapters(self.server.settings.base_url)

    def check(self) -> bool:
        """Resolve the reference now and apply a move; whether the server changed."""
        from tracelearn.registry import DEFAULT_ALIAS

        version = self.registry.resolve(self.reference, default_alias=DEFAULT_ALIAS)
        current = self.server.model
        if current.version_ref == version.ref:
            return False
        target = served_model_from_version(self.registry, version, served_name=current.served_name)
        if current.is_lora and target.is_lora and current.base_model == target.base_model and self.adapters:
            assert target.adapter is not None
            _log.info("hot-loading %s as %s (was %s)", version.ref, target.served_name, current.version_ref)
            self.adapters.unload(current.served_name)
            self.adapters.load(target.served_name, target.adapter)
            self.server.model = target
        else:
            _log.info("restarting vLLM for %s (was %s)", version.ref, current.version_ref)
            self.server.restart(replace(target, served_name=current.served_name))
        self.moves.append(version.ref)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as error:
                _log.warning("following %s failed (%s); retrying in %.0f s", self.reference, error, self.poll_seconds)


# --- Entry point ------------------------------------------------------------------------------------


def resolve_served_model(
    model_ref: str, registry: Registry | None = None, served_name: str | None = None
) -> tuple[ServedModel, bool]:
    """A local path, else a registry reference (``name`` = ``name@production``, ``name@alias``, ``name@N``),
    with or without the ``registry:`` prefix the embedded server uses.

    Returns the model and whether the reference can move (an alias: worth following).
    """
    model_ref = model_ref.removeprefix("registry:")
    path = Path(model_ref).expanduser()
    if path.exists():
        return served_model_from_directory(path, served_name), False
    from tracelearn.registry import DEFAULT_ALIAS, ArtifactRef, open_registry

    registry = registry or open_registry()
    version = registry.resolve(model_ref, default_alias=DEFAULT_ALIAS)
    movable = ArtifactRef.parse(model_ref, DEFAULT_ALIAS).version is None
    return served_model_from_version(registry, version, served_name), movable


def serve_with_vllm(
    model_ref: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_model_name: str | None = None,
    registry: Registry | None = None,
    follow: bool = True,
    poll_seconds: float = 10.0,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    max_lora_rank: int | None = None,
    max_model_len: int | None = None,
    extra_args: Sequence[str] = (),
    executable: Sequence[str] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve ``model_ref`` with vLLM until it exits or ``stop`` is set; returns vLLM's exit code.

    ``model_ref`` is a local model/adapter directory or a registry reference; an alias reference is
    followed (``follow``) every ``poll_seconds``. ``executable`` replaces ``python -m
    vllm.entrypoints.openai.api_server`` (then vllm need not be installed here).
    """
    if executable is None:
        require_vllm()
    model, movable = resolve_served_model(model_ref, registry, served_model_name)
    settings = VllmSettings(host=host, port=port, max_logprobs=max_logprobs, max_lora_rank=max_lora_rank,
                            max_model_len=max_model_len, extra_args=tuple(extra_args))
    if executable is not None:
        settings = replace(settings, executable=tuple(executable))
    server = VllmProcess(model, settings).start()
    stop = stop or threading.Event()
    follower_thread = None
    if follow and movable:
        from tracelearn.registry import open_registry

        follower = VllmFollower(registry or open_registry(), model_ref, server, poll_seconds)
        follower_thread = threading.Thread(target=follower.run, args=(stop,), name="tracelearn-vllm-follower",
                                           daemon=True)
        follower_thread.start()
    try:
        return server.wait(stop)
    finally:
        stop.set()
        server.stop()
        if follower_thread is not None:
            follower_thread.join(timeout=5)
