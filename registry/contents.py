"""What may be published, and whether stored bytes are still what was published.

``describe_source`` checks files offered for publishing and lists them with their checksums:

- a prompt is one non-empty UTF-8 text file (stored as ``prompt.txt``);
- a checkpoint is a Hugging Face model directory (``config.json``, weights as ``*.safetensors`` or
  ``pytorch_model*.bin``, a tokenizer), a peft LoRA adapter (``adapter_config.json`` naming its base
  model in ``base_model_name_or_path``, ``adapter_model.safetensors`` or ``.bin``), or a single GGUF
  file (or a directory holding exactly one).

``verify_files`` re-hashes stored files against their manifest, so a corrupted file is caught on
load instead of producing a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tracelearn.registry.artifacts import (
    PROMPT_FILE,
    ArtifactFormat,
    ArtifactKind,
    CorruptArtifactError,
    FileEntry,
    InvalidArtifactError,
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceContents:
    """Files to publish: each stored path mapped to the file on disk, the manifest, and the format."""

    format: ArtifactFormat
    sources: dict[str, Path]  # stored relative path -> file on disk
    files: tuple[FileEntry, ...]
    base_model: str | None = None  # a LoRA adapter's base model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source(kind: ArtifactKind, source: Path) -> SourceContents:
    """Validate ``source`` as a ``kind`` artifact and list its files; raises ``InvalidArtifactError``."""
    if not source.exists():
        raise InvalidArtifactError(f"{source} does not exist")
    if kind == "prompt":
        return _describe_prompt(source)
    if source.is_file():
        if source.suffix != ".gguf":
            raise InvalidArtifactError(f"{source} is a file but not a .gguf model: pass a checkpoint directory")
        return _contents("gguf", {source.name: source})
    files = _regular_files(source)
    if (source / "adapter_config.json").is_file():
        return _describe_lora(source, files)
    if (source / "config.json").is_file():
        return _describe_hf(source, files)
    ggufs = [path for path in files if path.endswith(".gguf")]
    if len(ggufs) == 1:
        return _contents("gguf", {ggufs[0]: source / ggufs[0]})
    raise InvalidArtifactError(
        f"{source} is not a checkpoint: expected a Hugging Face model directory (config.json and weights), "
        "a LoRA adapter (adapter_config.json and adapter_model.safetensors) or one .gguf file"
    )


def verify_files(root: Path, files: Iterable[FileEntry], label: str) -> None:
    """Raise ``CorruptArtifactError`` naming the first file under ``root`` whose size or SHA-256 changed."""
    for entry in files:
        path = root / entry.path
        if not path.is_file():
            raise CorruptArtifactError(f"{label}: file {entry.path} is missing from {root}")
        size = path.stat().st_size
        if size != entry.size:
            raise CorruptArtifactError(f"{label}: {entry.path} has {size} bytes, {entry.size} were published")
        actual = file_sha256(path)
        if actual != entry.sha256:
            raise CorruptArtifactError(
                f"{label}: {entry.path} has SHA-256 {actual[:16]}..., {entry.sha256[:16]}... was published: "
                "the stored file is corrupted; republish it or roll the alias back to another version"
            )


def _describe_prompt(source: Path) -> SourceContents:
    if not source.is_file():
        raise InvalidArtifactError(f"a prompt is one text file; {source} is a directory")
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArtifactError(f"prompt file {source} is not UTF-8 text: {error}") from error
    if not text.strip():
        raise InvalidArtifactError(f"prompt file {source} is empty")
    return _contents("text", {PROMPT_FILE: source})


def _describe_lora(source: Path, files: list[str]) -> SourceContents:
    config = _read_json(source / "adapter_config.json")
    base_model = config.get("base_model_name_or_path")
    if not isinstance(base_model, str) or not base_model:
        raise InvalidArtifactError(
            f"{source / 'adapter_config.json'} does not name its base model (base_model_name_or_path): "
            "a LoRA adapter can only be loaded onto a known base"
        )
    weights = [path for path in files if path in ("adapter_model.safetensors", "adapter_model.bin")]
    if not weights:
        raise InvalidArtifactError(f"LoRA adapter {source} has no adapter_model.safetensors or adapter_model.bin")
    _check_safetensors(source, files)
    return _contents("lora", {path: source / path for path in files}, base_model=base_model)


def _describe_hf(source: Path, files: list[str]) -> SourceContents:
    _read_json(source / "config.json")
    weights = [path for path in files if path.endswith(".safetensors") or
               (path.startswith("pytorch_model") and path.endswith(".bin"))]
    if not weights:
        raise InvalidArtifactError(
            f"{source} has a config.json but no weights (*.safetensors or pytorch_model*.bin): nothing to serve"
        )
    if not any(path in _TOKENIZER_FILES for path in files):
        raise InvalidArtifactError(
            f"{source} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): save it with tokenizer.save_pretrained"
        )
    _check_safetensors(source, files)
    return _contents("hf", {path: source / path for path in files})


def _check_safetensors(source: Path, files: list[str]) -> None:
    """A truncated or foreign ``.safetensors`` file fails here, at publish time, not when a server loads it."""
    for path in files:
        if not path.endswith(".safetensors"):
            continue
        full = source / path
        size = full.stat().st_size
        with full.open("rb") as stream:
            head = stream.read(8)
            header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if header_size <= 0 or 8 + header_size > size:
                raise InvalidArtifactError(f"{full} is not a valid safetensors file (header size {header_size})")
            try:
                header = json.loads(stream.read(header_size))
            except ValueError as error:
                raise InvalidArtifactError(f"{full} has an unreadable safetensors header: {error}") from error
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if 8 + header_size + max(ends, default=0) > size:
            raise InvalidArtifactError(f"{full} is truncated: its header describes more bytes than the file has")


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidArtifactError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise InvalidArtifactError(f"{path} must hold a JSON object")
    return data


def _regular_files(directory: Path) -> list[str]:
    """Relative paths of the regular files under ``directory``; hidden files and folders are not published."""
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        found.append(relative.as_posix())
    if not found:
        raise InvalidArtifactError(f"{directory} is empty")
    return found


def _contents(fmt: ArtifactFormat, sources: dict[str, Path], base_model: str | None = None) -> SourceContents:
    files = tuple(FileEntry(path, path_on_disk.stat().st_size, file_sha256(path_on_disk))
                  for path, path_on_disk in sorted(sources.items()))
    return SourceContents(fmt, sources, files, base_model)
