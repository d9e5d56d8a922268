"""Running vLLM's OpenAI-compatible server for a model directory or a registry version, and following an alias.

Owns: the command and environment of ``vllm serve`` (``vllm_command``; run as ``python -m
vllm.entrypoints.cli.main serve``, the deprecated ``vllm.entrypoints.openai.api_server`` module is not
used) with token ids and logprobs usable (``--max-logprobs``; token ids need nothing at launch: vLLM
returns them for requests carrying ``"return_token_ids": true``, which the gateway and the token-id
instrumentation add), LoRA adapters served by name on their base model (``--enable-lora
--max-lora-rank R --lora-modules {json}`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), the server
process (``VllmProcess``), and moving to a new version (``VllmFollower``): a LoRA version on the same
base that fits the server's rank is hot-loaded in place (``POST /v1/load_lora_adapter`` with
``load_inplace``: the served name keeps answering throughout, with the old weights until the new
ones are in), anything else restarts the server.

What the recorded logprobs mean is decided here, explicitly: ``--logprobs-mode processed_logprobs``
(the default ``VllmSettings.logprobs_mode``) reports the distribution each token was sampled from
(penalties, temperature, top-k/top-p applied), as the embedded server does
(``tracelearn.serving.sampling``); vLLM's own default, ``raw_logprobs``, is the model's distribution
before them. ``--generation-config vllm`` (the default ``generation_config``) keeps vLLM from applying
the model's ``generation_config.json`` (e.g. temperature 0.7, top-p 0.8) to requests that do not set
them, so what an agent sends, and its spans record, is what was sampled with; ``auto`` restores vLLM's
default.

vLLM pins its own torch and transformers (``VLLM_PIN``: torch 2.14, transformers < 5.23, which
tracelearn's ``serve`` extra cannot share), so it runs from its own environment:
``$TRACELEARN_VLLM_PYTHON``, else this Python when vllm imports here. Importable without vllm.
``serve_with_vllm`` is the entry point of ``tracelearn serve --engine vllm``.
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
from typing import TYPE_CHECKING, Final, Literal

import httpx

from tracelearn.processes import ChildProcess, ChildProcessError, start_child
from tracelearn.settings.variables import VLLM_PYTHON

if TYPE_CHECKING:
    from tracelearn.registry import ArtifactVersion, Registry

# The release the launch command is written for and checked against (tests/contracts/), installable from
# PyPI: vLLM 0.34.0 pins flashinfer-python==0.7.3, which PyPI does not have.
VLLM_PIN: Final = "0.33.0"
VLLM_PYTHON_ENV: Final = VLLM_PYTHON.name
VLLM_INSTALL: Final = f"python3.12 -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm=={VLLM_PIN}"
VLLM_MISSING: Final = (
    f"vllm is not installed here and {VLLM_PYTHON_ENV} is not set: vLLM pins its own torch and transformers, so it "
    f"lives in an environment of its own; on a CUDA machine run `{VLLM_INSTALL}` and set "
    f"{VLLM_PYTHON_ENV}=~/vllm-env/bin/python"
)
VLLM_MODULE: Final = "vllm.entrypoints.cli.main"  # the `vllm` command: `python -m vllm.entrypoints.cli.main serve`
RUNTIME_LORA_ENV: Final = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
DEFAULT_MAX_LOGPROBS: Final = 20
ADAPTER_CONFIG: Final = "adapter_config.json"
# vLLM's allowed --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks); its parser refuses any other.
VLLM_LORA_RANKS: Final = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The rank a server is started with when the adapter does not say its own.
DEFAULT_LORA_RANK: Final = 64
LogprobsMode = Literal["processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits"]

_log = logging.getLogger(__name__)


class VllmNotInstalledError(RuntimeError):
    """vllm cannot be imported in this environment."""

    def __init__(self) -> None:
        super().__init__(VLLM_MISSING)


class VllmServerError(RuntimeError):
    """The vLLM server did not come up, exited, or refused an adapter change."""


def vllm_python() -> str:
    """The Python that runs vLLM: ``$TRACELEARN_VLLM_PYTHON``, else this one when vllm is importable here
    (checked without importing it: CUDA init is slow); ``VllmNotInstalledError`` otherwise."""
    configured = VLLM_PYTHON.optional()
    if configured is not None:
        return str(configured)
    if importlib.util.find_spec("vllm") is None:
        raise VllmNotInstalledError()
    return sys.executable


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
    logprobs_mode: LogprobsMode = "processed_logprobs"  # the sampled distribution's (module docstring)
    generation_config: str = "vllm"  # "vllm": no model defaults on requests; "auto" or a folder: vLLM's
    max_lora_rank: int | None = None  # default: the adapter's own rank (r) rounded up to VLLM_LORA_RANKS, else 64
    max_loras: int = 2  # adapters resident on the GPU at once
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    extra_args: tuple[str, ...] = ()
    executable: tuple[str, ...] = (sys.executable, "-m", VLLM_MODULE, "serve")
    ready_timeout_s: float = 900.0  # large models take minutes to load and compile

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def max_lora_rank(rank: int) -> int:
    """The smallest of vLLM's allowed ``--max-lora-rank`` values that holds an adapter of rank ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VllmServerError(
        f"a LoRA adapter of rank {rank} cannot be served by vLLM, whose largest --max-lora-rank is "
        f"{VLLM_LORA_RANKS[-1]}: train it with lora.r <= {VLLM_LORA_RANKS[-1]}"
    )


def served_lora_rank(model: ServedModel, settings: VllmSettings) -> int:
    """``--max-lora-rank`` for ``model``: the setting, else the adapter's rank rounded up to an allowed value
    (said in the log when it differs), else ``DEFAULT_LORA_RANK``."""
    wanted = settings.max_lora_rank
    if wanted is not None:
        if wanted not in VLLM_LORA_RANKS:
            raise VllmServerError(f"max_lora_rank={wanted} is not one of vLLM's allowed ranks {VLLM_LORA_RANKS}")
        if model.lora_rank is not None and model.lora_rank > wanted:
            raise VllmServerError(f"max_lora_rank={wanted} is below the adapter's rank {model.lora_rank}")
        return wanted
    rank = model.lora_rank or DEFAULT_LORA_RANK
    served = max_lora_rank(rank)
    if served != rank:
        _log.info("LoRA rank %d is served with --max-lora-rank %d, the next of vLLM's allowed ranks", rank, served)
    return served


def vllm_command(model: ServedModel, settings: VllmSettings) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions that serve ``model`` with ``settings``."""
    base_name = f"{model.served_name}-base" if model.is_lora else model.served_name
    command = [
        *settings.executable,
        model.base_model,  # `vllm serve MODEL`
        "--served-model-name", base_name,
        "--host", settings.host,
        "--port", str(settings.port),
        "--max-logprobs", str(settings.max_logprobs),
        "--logprobs-mode", settings.logprobs_mode,
        "--generation-config", settings.generation_config,
    ]
    env: dict[str, str] = {}
    if model.is_lora:
        # The JSON form: vLLM reads NAME=PATH only when the text has no comma, and a path may have one.
        module = {"name": model.served_name, "path": str(model.adapter), "base_model_name": base_name}
        command += [
            "--enable-lora",
            "--max-lora-rank", str(served_lora_rank(model, settings)),
            "--max-loras", str(settings.max_loras),
            "--lora-modules", json.dumps(module),
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
        self.lora_rank: int | None = None  # the --max-lora-rank of the running server (LoRA only)

    def start(self) -> VllmProcess:
        command, extra_env = vllm_command(self.model, self.settings)
        self.lora_rank = served_lora_rank(self.model, self.settings) if self.model.is_lora else None
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

    def _post(self, path: str, body: Mapping[str, str | bool]) -> None:
        response = httpx.post(f"{self.base_url}/{path}", json=dict(body), timeout=self.timeout_s)
        if response.status_code >= 400:
            raise VllmServerError(
                f"vLLM refused {path} {dict(body)}: HTTP {response.status_code} {response.text[:500]}"
            )

    def load(self, name: str, path: Path, *, in_place: bool = False) -> None:
        """Load ``path`` as ``name``; ``in_place`` replaces the weights of an adapter already served by that
        name, which keeps answering meanwhile (vLLM's ``load_inplace``)."""
        body: dict[str, str | bool] = {"lora_name": name, "lora_path": str(path)}
        if in_place:
            body["load_inplace"] = True
        self._post("load_lora_adapter", body)

    def unload(self, name: str) -> None:
        self._post("unload_lora_adapter", {"lora_name": name})


# --- Following an alias -----------------------------------------------------------------------------


@dataclass
class VllmFollower:
    """Polls a registry reference (``name@production``) and moves the server to the version it names.

    A LoRA version onto a LoRA version of the same base, within the server's ``--max-lora-rank``, is
    hot-loaded in place (no moment without the served name); any other move restarts the process. A
    failed move is logged and retried at the next poll; the server keeps what it had.
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
        same_base = current.is_lora and target.is_lora and current.base_model == target.base_model
        fits = (target.lora_rank or DEFAULT_LORA_RANK) <= (self.server.lora_rank or 0)
        if same_base and fits and self.adapters:
            assert target.adapter is not None
            _log.info("hot-loading %s as %s in place (was %s)", version.ref, target.served_name, current.version_ref)
            self.adapters.load(target.served_name, target.adapter, in_place=True)
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
    followed (``follow``) every ``poll_seconds``. ``executable`` replaces ``PYTHON -m
    vllm.entrypoints.cli.main serve`` (PYTHON: ``vllm_python()``; with ``executable`` vllm need not be
    installed anywhere).
    """
    if executable is None:
        executable = (vllm_python(), "-m", VLLM_MODULE, "serve")
    model, movable = resolve_served_model(model_ref, registry, served_model_name)
    settings = VllmSettings(host=host, port=port, max_logprobs=max_logprobs, max_lora_rank=max_lora_rank,
                            max_model_len=max_model_len, extra_args=tuple(extra_args), executable=tuple(executable))
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
