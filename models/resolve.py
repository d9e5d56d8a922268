"""Model names to files: ``resolve_model`` maps a name, a path, a hub id or a registry reference to a
``ModelSource``, and never downloads.

Names: ``smollm2`` / ``SmolLM2-135M-Instruct`` (the default model in the cache), a Hugging Face model
directory, a peft LoRA adapter directory (its base resolved by the same rules), a ``.gguf`` file, a
Hugging Face hub id already in the local hub cache, and ``registry:NAME@ALIAS`` / ``registry:NAME@N``
(``registry:NAME`` means ``NAME@production``). A registry reference is resolved in the registry the
caller passes (``None``: ``open_registry()``, the default location). The version's files come from
``Registry.local_path`` (checksums verified, so a corrupted file raises ``CorruptArtifactError``
instead of loading different weights); the source is named after the version: model id
``calc-policy@7``, model version ``calc-policy@7+<first 12 hex of the manifest digest>``. A LoRA
version is loaded onto its base (the lineage's ``base_model``, else the adapter config's), itself
resolved in the same registry.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tracelearn.models.default_model import (
    CACHE_ENV,
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    FETCH_COMMAND,
    converted_default_model_path,
    default_model_path,
    is_default_model_name,
)
from tracelearn.models.source import ADAPTER_CONFIG, ModelNotFoundError, ModelSource

if TYPE_CHECKING:
    from tracelearn.registry import ArtifactRef, ArtifactVersion, Registry

REGISTRY_PREFIX = "registry:"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A chain of LoRA bases longer than this is a cycle (an adapter whose base resolves to itself).
_MAX_BASE_DEPTH = 8
_resolving = threading.local()


def resolve_model(
    name_or_path: str, cache_dir: Path | None = None, *, registry: Registry | None = None
) -> ModelSource:
    """The files ``name_or_path`` names (see the module docstring); ``registry`` resolves ``registry:``
    references (``None``: the default registry). Raises ``ModelNotFoundError`` saying what is missing."""
    if name_or_path.startswith(REGISTRY_PREFIX):
        return resolve_registry_model(name_or_path, registry, cache_dir)
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
        return _resolve_directory(path.resolve(), cache_dir, registry)
    if _HUB_ID.match(name_or_path):
        return _resolve_hub_cache(name_or_path)
    raise ModelNotFoundError(
        f"no model named {name_or_path!r}: pass 'smollm2', a Hugging Face model directory, a .gguf file, "
        f"a hub id already downloaded to the Hugging Face cache, or {REGISTRY_PREFIX}NAME@ALIAS"
    )


def _resolve_directory(
    directory: Path, cache_dir: Path | None = None, registry: Registry | None = None
) -> ModelSource:
    if (directory / ADAPTER_CONFIG).is_file():
        base = resolve_model(adapter_base(directory), cache_dir, registry=registry)
        return ModelSource(directory, None, directory.name, base=base)
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


# --- Registry references ----------------------------------------------------------------------------


def parse_registry_model(reference: str) -> ArtifactRef:
    """``registry:NAME@ALIAS`` / ``registry:NAME@N`` / ``registry:NAME`` (alias ``production``)."""
    from tracelearn.registry import DEFAULT_ALIAS, ArtifactRef

    if not reference.startswith(REGISTRY_PREFIX):
        raise ModelNotFoundError(f"{reference!r} is not a registry reference ({REGISTRY_PREFIX}NAME@ALIAS)")
    return ArtifactRef.parse(reference.removeprefix(REGISTRY_PREFIX), default_alias=DEFAULT_ALIAS)


def registry_model_version(version: ArtifactVersion) -> str:
    """The ``model_version`` a server reports for a registry version: ``calc-policy@7+3f2a9c1b0d4e``."""
    return f"{version.ref}+{version.digest[:12]}"


def resolve_registry_model(
    reference: str, registry: Registry | None = None, cache_dir: Path | None = None
) -> ModelSource:
    """The files of the registry version ``reference`` names (checksums verified)."""
    from tracelearn.registry import open_registry

    chosen = registry or open_registry()
    return registry_model_source(chosen, chosen.resolve(parse_registry_model(reference)), cache_dir)


def registry_model_source(registry: Registry, version: ArtifactVersion, cache_dir: Path | None = None) -> ModelSource:
    """A ``ModelSource`` for one registry checkpoint version; raises ``CorruptArtifactError`` when a
    stored file no longer matches its checksum, ``InvalidArtifactError`` for a prompt.
    """
    from tracelearn.registry import InvalidArtifactError

    if version.kind != "checkpoint":
        raise InvalidArtifactError(f"{version.ref} in {registry.location} is a {version.kind}, not a model checkpoint")
    directory = registry.local_path(version, verify=True)
    model_version = registry_model_version(version)
    if version.format == "gguf":
        ggufs = sorted(entry.path for entry in version.files if entry.path.endswith(".gguf"))
        return ModelSource(directory, ggufs[0], version.ref, model_version)
    if version.format == "lora":
        base_name = version.lineage.base_model or adapter_base(directory)
        with _resolving_base(version.ref):
            base = resolve_model(base_name, cache_dir, registry=registry)
        return ModelSource(directory, None, version.ref, model_version, base=base)
    return ModelSource(directory, None, version.ref, model_version)


@contextmanager
def _resolving_base(ref: str) -> Iterator[None]:
    chain: list[str] = getattr(_resolving, "chain", [])
    if ref in chain or len(chain) >= _MAX_BASE_DEPTH:
        raise ModelNotFoundError(f"LoRA base models form a cycle or a chain too long: {' -> '.join([*chain, ref])}")
    _resolving.chain = [*chain, ref]
    try:
        yield
    finally:
        _resolving.chain = chain
