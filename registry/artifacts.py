"""What the registry stores and hands out: references, versions, file manifests, lineage, alias moves.

A version is immutable and content addressed: its ``digest`` is the SHA-256 of its manifest (the
sorted relative paths, sizes and SHA-256 of its files), so the same files give the same digest on
any backend. Every backend returns these frozen records; nothing here touches storage.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ArtifactKind = Literal["prompt", "checkpoint"]
ARTIFACT_KINDS: tuple[ArtifactKind, ...] = ("prompt", "checkpoint")

# Checkpoint formats: a Hugging Face model directory, a peft LoRA adapter on a named base model, or one
# GGUF file (the embedded default policy ships that way). Prompts have one format: UTF-8 text.
ArtifactFormat = Literal["text", "hf", "lora", "gguf"]

LATEST_ALIAS = "latest"
DEFAULT_ALIAS = "production"
PROMPT_FILE = "prompt.txt"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Aliases start with a letter so that ``name@7`` always means a version number, and may not be ``v``
# followed by digits, so that ``name@v7`` does too (such an alias could never be reached).
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^v?([0-9]{1,9})$")
_VERSION_LIKE = re.compile(r"^v?[0-9]+$")


class RegistryError(Exception):
    """Base of every registry error; the message names the artifact and says what to do."""


class InvalidReferenceError(RegistryError, ValueError):
    """A name, alias or ``name@selector`` reference that is not well formed."""


class ArtifactNotFoundError(RegistryError, LookupError):
    """No artifact with that name (or no such version or alias of it)."""


class InvalidArtifactError(RegistryError, ValueError):
    """Files offered for publishing that are not a valid prompt or checkpoint (or bad lineage)."""


class CorruptArtifactError(RegistryError):
    """A stored file whose bytes no longer match the checksum recorded when it was published."""


class AliasConflictError(RegistryError):
    """Another process moved the alias between reading it and moving it: nothing was changed."""


class RegistryWriteError(RegistryError, OSError):
    """The registry's storage refused a write (read-only disk, permissions, full disk)."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidReferenceError(
            f"invalid artifact name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_alias(alias: str) -> str:
    if not _ALIAS.match(alias):
        raise InvalidReferenceError(
            f"invalid alias {alias!r}: use 1-64 letters, digits, '_' or '-', starting with a letter"
        )
    if _VERSION_LIKE.match(alias):
        raise InvalidReferenceError(
            f"invalid alias {alias!r}: it reads as a version number (NAME@vN names version N), so the alias "
            f"could never be reached; choose another name, e.g. 'release-{alias[1:]}'"
        )
    return alias


@dataclass(frozen=True)
class ArtifactRef:
    """``name`` (alias ``latest``), ``name@alias`` or ``name@N`` / ``name@vN`` (a version number)."""

    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str, default_alias: str = LATEST_ALIAS) -> ArtifactRef:
        name, _, selector = text.strip().partition("@")
        check_name(name)
        if not selector:
            return cls(name, alias=check_alias(default_alias))
        number = _VERSION.match(selector)
        if number:
            version = int(number.group(1))
            if version < 1:
                raise InvalidReferenceError(f"invalid reference {text!r}: versions are numbered from 1")
            return cls(name, version=version)
        return cls(name, alias=check_alias(selector))

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: its path relative to the version root, size in bytes and SHA-256."""

    path: str
    size: int
    sha256: str


def manifest_digest(files: tuple[FileEntry, ...]) -> str:
    """SHA-256 of the canonical manifest: the identity of a version's content on every backend."""
    canonical = [[entry.path, entry.size, entry.sha256] for entry in sorted(files, key=lambda entry: entry.path)]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Lineage:
    """Where a version came from. Every field is optional; training fills what it knows.

    ``dataset`` is the location of the input dataset, ``partitions`` the partitions read (for example
    ``date=2026-11-20``), ``dataset_snapshot`` a content hash of exactly the files read, ``parent`` the
    reference of the version this one was trained or edited from (``calc-policy@6``), ``metrics`` the
    evaluation results (finite numbers), ``code_revision`` the git commit of the code that produced it.
    """

    dataset: str | None = None
    partitions: tuple[str, ...] = ()
    dataset_snapshot: str | None = None
    pipeline_config_hash: str | None = None
    training_run_id: str | None = None
    base_model: str | None = None
    parent: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    code_revision: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "lineage") -> Lineage:
        """Validate a decoded lineage document; unknown keys and wrong types are errors naming the key."""
        if not isinstance(data, Mapping):
            raise InvalidArtifactError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArtifactError(
                f"{source}: unknown lineage keys {unknown}; allowed: {sorted(known)} (put anything else under 'extra')"
            )
        values: dict[str, Any] = {}
        for key in ("dataset", "dataset_snapshot", "pipeline_config_hash", "training_run_id", "base_model",
                    "parent", "code_revision"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidArtifactError(f"{source}: '{key}' must be a string, got {type(value).__name__}")
            values[key] = value
        partitions = data.get("partitions", [])
        if not isinstance(partitions, list | tuple) or not all(isinstance(p, str) for p in partitions):
            raise InvalidArtifactError(f"{source}: 'partitions' must be a list of strings")
        metrics = data.get("metrics", {})
        if not isinstance(metrics, Mapping):
            raise InvalidArtifactError(f"{source}: 'metrics' must be an object of name -> number")
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidArtifactError(f"{source}: metric {metric!r} must be a finite number, got {value!r}")
        extra = data.get("extra", {})
        if not isinstance(extra, Mapping):
            raise InvalidArtifactError(f"{source}: 'extra' must be an object")
        return cls(
            partitions=tuple(partitions),
            metrics={str(k): float(v) for k, v in metrics.items()},
            extra=dict(extra),
            **values,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["partitions"] = list(self.partitions)
        data["metrics"] = dict(self.metrics)
        data["extra"] = dict(self.extra)
        return data


@dataclass(frozen=True)
class ArtifactVersion:
    """One immutable, published version of a prompt or a checkpoint."""

    name: str
    version: int
    kind: ArtifactKind
    format: ArtifactFormat
    digest: str
    files: tuple[FileEntry, ...]
    created_at: str  # ISO 8601, UTC
    lineage: Lineage = field(default_factory=Lineage)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "format": self.format,
            "digest": self.digest,
            "files": [asdict(entry) for entry in self.files],
            "created_at": self.created_at,
            "lineage": self.lineage.to_dict(),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactVersion:
        return cls(
            name=data["name"],
            version=int(data["version"]),
            kind=data["kind"],
            format=data["format"],
            digest=data["digest"],
            files=tuple(FileEntry(**entry) for entry in data["files"]),
            created_at=data["created_at"],
            lineage=Lineage.from_dict(data.get("lineage", {})),
            metadata=dict(data.get("metadata", {})),
        )


@dataclass(frozen=True)
class Published:
    """The result of a publish: the version, and whether it is new (False: identical content existed)."""

    version: ArtifactVersion
    created: bool


@dataclass(frozen=True)
class AliasMove:
    """One entry of an alias's audit log: which version it now names and which it named before."""

    name: str
    alias: str
    version: int
    previous: int | None
    sequence: int  # 1 for the alias's first move, then +1 per move
    moved_at: str  # ISO 8601, UTC
    actor: str  # user@host of the process that moved it
    reason: str = ""
    rollback: bool = False  # a rollback undoes the latest promotion that is still in effect

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AliasMove:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
