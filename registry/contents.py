"""What may be published, and whether stored bytes are still what was published.

``describe_source`` checks files offered for publishing and lists them with their checksums:

- a prompt is one non-empty UTF-8 text file (stored as ``prompt.txt``);
- a checkpoint is a Hugging Face model directory (``config.json``, weights as ``*.safetensors`` or
  ``pytorch_model*.bin``, a tokenizer), a peft LoRA adapter (``adapter_config.json`` naming its base
  model in ``base_model_name_or_path``, ``adapter_model.safetensors`` or ``.bin``), or a single GGUF
  file (or a directory holding exactly one).

Links: a link inside the source directory is published as the file it names; a link that leaves the
directory (``/etc/passwd``, a Hugging Face cache's ``../../blobs/...``) is refused, naming the link,
unless ``follow_links`` asks to copy its target; a dangling link or a directory-link cycle is refused.

``verify_stored`` checks a version's files before they are loaded: the manifest still hashes to the
version's digest (a manifest edited together with its file is caught), no file outside the manifest
sits in the directory (a loader would read it under the version's name), and every file is re-hashed
against the manifest, so a corrupted file is caught on load instead of producing a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tracelearn.registry.artifacts import (
    PROMPT_FILE,
    ArtifactFormat,
    ArtifactKind,
    ArtifactVersion,
    CorruptArtifactError,
    FileEntry,
    InvalidArtifactError,
    manifest_digest,
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


def describe_source(kind: ArtifactKind, source: Path, follow_links: bool = False) -> SourceContents:
    """Validate ``source`` as a ``kind`` artifact and list its files; raises ``InvalidArtifactError``.

    ``follow_links`` copies the targets of links that leave a source directory instead of refusing them.
    """
    if not source.exists():
        raise InvalidArtifactError(f"{source} does not exist")
    if kind == "prompt":
        return _describe_prompt(source)
    if source.is_file():
        if source.suffix != ".gguf":
            raise InvalidArtifactError(f"{source} is a file but not a .gguf model: pass a checkpoint directory")
        return _contents("gguf", {source.name: source})
    files = _regular_files(source, follow_links)
    if "adapter_config.json" in files:
        return _describe_lora(source, files)
    if "config.json" in files:
        return _describe_hf(source, files)
    ggufs = [path for path in files if path.endswith(".gguf")]
    if len(ggufs) == 1:
        return _contents("gguf", {ggufs[0]: files[ggufs[0]]})
    raise InvalidArtifactError(
        f"{source} is not a checkpoint: expected a Hugging Face model directory (config.json and weights), "
        "a LoRA adapter (adapter_config.json and adapter_model.safetensors) or one .gguf file"
    )


def verify_stored(root: Path, version: ArtifactVersion, label: str) -> None:
    """Raise ``CorruptArtifactError`` unless ``root`` holds exactly ``version``'s files, unchanged.

    Checks that the manifest hashes to the version's digest, that nothing outside the manifest is in
    ``root`` (files, folders or links a loader would pick up), then every file's size and SHA-256.
    """
    recorded = manifest_digest(version.files)
    if recorded != version.digest:
        raise CorruptArtifactError(
            f"{label}: its manifest hashes to {recorded[:16]}..., but the version's digest is "
            f"{version.digest[:16]}...: the manifest was edited after publishing; republish the artifact or "
            "roll the alias back to another version"
        )
    unlisted = _unlisted_entries(root, {entry.path for entry in version.files})
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise CorruptArtifactError(
            f"{label}: {root} holds {shown}, not in the version's manifest; a loader would read "
            f"{'it' if len(unlisted) == 1 else 'them'} under {version.ref}: remove what was added, or republish"
        )
    verify_files(root, version.files, label)


def _unlisted_entries(root: Path, listed: set[str]) -> list[str]:
    """Paths under ``root`` (relative, POSIX) that are neither a listed file nor a folder holding one."""
    folders = {str(parent) for path in listed for parent in PurePosixPath(path).parents if str(parent) != "."}
    unlisted: list[str] = []
    for directory, subdirectories, names in os.walk(root):  # links are not followed: a link is an entry
        base = PurePosixPath(Path(directory).relative_to(root).as_posix())
        for name in names:
            if (relative := str(base / name)) not in listed:
                unlisted.append(relative)
        for name in list(subdirectories):
            relative = str(base / name)
            if relative not in folders or Path(directory, name).is_symlink():
                unlisted.append(relative + "/")
                subdirectories.remove(name)
    return sorted(unlisted)


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


def _describe_lora(source: Path, files: dict[str, Path]) -> SourceContents:
    config = _read_json(files["adapter_config.json"])
    base_model = config.get("base_model_name_or_path")
    if not isinstance(base_model, str) or not base_model:
        raise InvalidArtifactError(
            f"{source / 'adapter_config.json'} does not name its base model (base_model_name_or_path): "
            "a LoRA adapter can only be loaded onto a known base"
        )
    weights = [path for path in files if path in ("adapter_model.safetensors", "adapter_model.bin")]
    if not weights:
        raise InvalidArtifactError(f"LoRA adapter {source} has no adapter_model.safetensors or adapter_model.bin")
    _check_safetensors(files)
    return _contents("lora", files, base_model=base_model)


def _describe_hf(source: Path, files: dict[str, Path]) -> SourceContents:
    _read_json(files["config.json"])
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
    _check_safetensors(files)
    return _contents("hf", files)


def _check_safetensors(files: dict[str, Path]) -> None:
    """A truncated or foreign ``.safetensors`` file fails here, at publish time, not when a server loads it."""
    for path, full in files.items():
        if not path.endswith(".safetensors"):
            continue
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


def _regular_files(directory: Path, follow_links: bool) -> dict[str, Path]:
    """Relative path -> the file to read, for the regular files under ``directory``.

    Hidden files and folders are not published. A link is read as the file (or folder) it names; one
    that leaves ``directory`` is refused unless ``follow_links``. The mapped path is the link's resolved
    target, so the bytes hashed here are the bytes uploaded even if the link changes meanwhile.
    """
    root = directory.resolve()
    found: dict[str, Path] = {}

    def walk(folder: Path, relative: PurePosixPath, chain: tuple[Path, ...]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda item: item.name):
            if entry.name.startswith("."):
                continue
            path, stored = Path(entry.path), relative / entry.name
            target = path.resolve() if entry.is_symlink() else path
            if entry.is_symlink():
                _check_link(directory / stored, path, target, root, follow_links)
            if target.is_dir():
                real = target.resolve()
                if real in chain:
                    raise InvalidArtifactError(
                        f"{directory / stored} links back to {real}, a folder that contains it: remove the link"
                    )
                walk(target, stored, (*chain, real))
            elif target.is_file():
                found[stored.as_posix()] = target

    walk(root, PurePosixPath(), (root,))
    if not found:
        raise InvalidArtifactError(f"{directory} is empty")
    return found


def _check_link(shown: Path, link: Path, target: Path, root: Path, follow_links: bool) -> None:
    """Refuse a dangling link, and a link that leaves ``root`` unless ``follow_links``."""
    if not target.exists():
        raise InvalidArtifactError(f"{shown} is a link to {link.readlink()}, which does not exist")
    if not follow_links and not target.is_relative_to(root):
        raise InvalidArtifactError(
            f"{shown} is a link to {target}, outside {root}: only files inside the source directory are "
            "published; replace the link with the file, or pass --follow-links (follow_links=True) to copy "
            "what it points to"
        )


def _contents(fmt: ArtifactFormat, sources: dict[str, Path], base_model: str | None = None) -> SourceContents:
    files = tuple(FileEntry(path, path_on_disk.stat().st_size, file_sha256(path_on_disk))
                  for path, path_on_disk in sorted(sources.items()))
    return SourceContents(fmt, sources, files, base_model)
