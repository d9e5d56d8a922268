"""The registry interface every backend implements, with the logic they share.

A backend stores versions and alias moves (the primitives marked abstract); publishing checks,
reference resolution, promotion, rollback, prompt reading and metadata search are written once here
on top of them. ``open_registry`` picks the backend from a location:

- a path or any pyarrow filesystem URI (``/srv/registry``, ``file:///...``, ``s3://bucket/registry``):
  ``FilesystemRegistry``;
- ``mlflow+http://host:5000`` (or ``mlflow+https://``, ``mlflow+file:...``): ``MlflowRegistry`` on that
  tracking server.

Default location: ``$TRACELEARN_REGISTRY``, else ``~/.cache/tracelearn/registry``.
"""

from __future__ import annotations

import getpass
import os
import socket
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from tracelearn.registry.artifacts import (
    ARTIFACT_KINDS,
    LATEST_ALIAS,
    PROMPT_FILE,
    AliasConflictError,
    AliasMove,
    ArtifactKind,
    ArtifactNotFoundError,
    ArtifactRef,
    ArtifactVersion,
    InvalidArtifactError,
    InvalidReferenceError,
    Lineage,
    Published,
    check_alias,
    check_name,
)
from tracelearn.registry.contents import SourceContents, describe_source
from tracelearn.settings.variables import REGISTRY, REGISTRY_CACHE

REGISTRY_ENV = REGISTRY.name
REGISTRY_CACHE_ENV = REGISTRY_CACHE.name


def registry_cache_dir() -> Path:
    """Where remote backends download versions, by digest: ``$TRACELEARN_REGISTRY_CACHE`` or the default."""
    return REGISTRY_CACHE.value()


def default_registry_location() -> str:
    """``$TRACELEARN_REGISTRY``, else ``~/.cache/tracelearn/registry``."""
    return REGISTRY.value()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def current_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class Registry(ABC):
    """Named artifacts with immutable numbered versions, aliases with an audit log, and lineage."""

    location: str

    # ---- primitives each backend implements -------------------------------------------------------

    @abstractmethod
    def names(self) -> list[str]:
        """Every artifact name, sorted."""

    @abstractmethod
    def versions(self, name: str) -> list[ArtifactVersion]:
        """Every visible version of ``name``, oldest first; ``ArtifactNotFoundError`` for an unknown name."""

    @abstractmethod
    def alias_moves(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """The audit log of ``name``'s aliases (one alias, or all), oldest first."""

    @abstractmethod
    def local_path(self, version: ArtifactVersion, verify: bool = True) -> Path:
        """A local directory holding the version's files (downloaded and cached for remote backends).

        With ``verify`` the manifest is checked against the version's digest, every file is re-hashed
        against the manifest, and a file that is not in the manifest is refused: each raises
        ``CorruptArtifactError``.
        """

    @abstractmethod
    def _store_version(self, kind: ArtifactKind, name: str, contents: SourceContents, lineage: Lineage,
                       metadata: Mapping[str, str]) -> Published:
        """Store a new version atomically (or return the existing one with the same digest)."""

    @abstractmethod
    def _append_alias_move(self, move: AliasMove) -> AliasMove:
        """Record ``move`` as the alias's next entry; ``AliasConflictError`` if ``move.sequence`` is taken."""

    # ---- shared behaviour -------------------------------------------------------------------------

    def publish(self, kind: ArtifactKind, name: str, source: Path, *, lineage: Lineage | None = None,
                metadata: Mapping[str, str] | None = None, follow_links: bool = False) -> Published:
        """Publish the file or directory ``source`` as the next version of ``name``.

        Identical content (same manifest digest) returns the existing version with ``created=False``.
        A LoRA adapter's base model is recorded in the lineage when the lineage does not name one.
        A link in ``source`` that leaves it is refused (``InvalidArtifactError`` naming the link) unless
        ``follow_links``, which copies what it points to.
        """
        if kind not in ARTIFACT_KINDS:
            raise InvalidArtifactError(f"unknown artifact kind {kind!r}: use one of {', '.join(ARTIFACT_KINDS)}")
        check_name(name)
        contents = describe_source(kind, Path(source), follow_links)
        chosen = lineage or Lineage()
        if contents.base_model and not chosen.base_model:
            chosen = Lineage.from_dict({**chosen.to_dict(), "base_model": contents.base_model})
        checked = {str(key): str(value) for key, value in (metadata or {}).items()}
        existing = self._kind_of(name)
        if existing is not None and existing != kind:
            raise InvalidArtifactError(f"{name} holds {existing}s; publish a {kind} under another name")
        return self._store_version(kind, name, contents, chosen, checked)

    def publish_prompt(self, name: str, text: str, *, lineage: Lineage | None = None,
                       metadata: Mapping[str, str] | None = None) -> Published:
        """Publish prompt text directly (APO and tests do not need a file)."""
        with tempfile.TemporaryDirectory(prefix="tracelearn-prompt-") as scratch:
            path = Path(scratch) / PROMPT_FILE
            path.write_text(text, encoding="utf-8")
            return self.publish("prompt", name, path, lineage=lineage, metadata=metadata)

    def version(self, name: str, number: int) -> ArtifactVersion:
        for candidate in self.versions(name):
            if candidate.version == number:
                return candidate
        raise ArtifactNotFoundError(f"{name} has no version {number} (it has {self._version_list(name)})")

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version for ``name``, including the automatic ``latest``."""
        versions = self.versions(name)
        held = {}
        for alias in sorted({move.alias for move in self.alias_moves(name)}):
            holder = self._alias_holder(name, alias)
            if holder is not None:
                held[alias] = holder
        if versions:
            held[LATEST_ALIAS] = versions[-1].version
        return held

    def resolve(self, reference: str | ArtifactRef, default_alias: str = LATEST_ALIAS) -> ArtifactVersion:
        """The version a reference names: ``name`` (``default_alias``), ``name@alias`` or ``name@N``."""
        ref = reference if isinstance(reference, ArtifactRef) else ArtifactRef.parse(reference, default_alias)
        if ref.version is not None:
            return self.version(ref.name, ref.version)
        assert ref.alias is not None
        if ref.alias == LATEST_ALIAS:
            versions = self.versions(ref.name)
            if not versions:
                raise ArtifactNotFoundError(f"{ref.name} has no versions yet")
            return versions[-1]
        holder = self._alias_holder(ref.name, ref.alias)
        if holder is None:
            known = ", ".join(sorted(self.aliases(ref.name))) or "none"
            raise ArtifactNotFoundError(
                f"{ref.name} has no alias {ref.alias!r} (aliases: {known}); "
                f"set it with: tracelearn registry promote {ref.name} VERSION --alias {ref.alias}"
            )
        return self.version(ref.name, holder)

    def promote(self, name: str, version: int, alias: str, *, reason: str = "",
                expected_sequence: int | None = None) -> AliasMove:
        """Point ``alias`` at ``version`` atomically; the previous holder is recorded in the audit log.

        ``expected_sequence`` (the sequence of the alias's latest move as the caller saw it) turns a
        concurrent move into an ``AliasConflictError`` instead of silently overriding it.
        """
        check_alias(alias)
        if alias == LATEST_ALIAS:
            raise InvalidReferenceError("'latest' always names the newest version and cannot be moved")
        self.version(name, version)  # the target must exist
        moves = self.alias_moves(name, alias)
        last = moves[-1].sequence if moves else 0
        if expected_sequence is not None and expected_sequence != last:
            raise AliasConflictError(
                f"{name}@{alias} moved since it was read (move {last}, expected {expected_sequence}); nothing changed"
            )
        stack = _promotion_stack(moves)
        move = AliasMove(name, alias, version, stack[-1] if stack else None, last + 1, utc_now(),
                         current_actor(), reason)
        return self._append_alias_move(move)

    def rollback(self, name: str, alias: str, *, reason: str = "") -> AliasMove:
        """Undo the latest promotion of ``alias`` still in effect: it goes back to the version it named before."""
        check_alias(alias)
        moves = self.alias_moves(name, alias)
        stack = _promotion_stack(moves)
        if len(stack) < 2:
            raise ArtifactNotFoundError(
                f"{name}@{alias} has no earlier version to roll back to (history: {[m.version for m in moves]})"
            )
        move = AliasMove(name, alias, stack[-2], stack[-1], moves[-1].sequence + 1, utc_now(), current_actor(),
                         reason or f"rollback from version {stack[-1]}", rollback=True)
        return self._append_alias_move(move)

    def read_prompt(self, reference: str | ArtifactRef,
                    default_alias: str = LATEST_ALIAS) -> tuple[ArtifactVersion, str]:
        """The prompt version a reference names and its text (checksum verified)."""
        version = self.resolve(reference, default_alias)
        if version.kind != "prompt":
            raise InvalidArtifactError(f"{version.ref} is a {version.kind}, not a prompt")
        text = (self.local_path(version) / PROMPT_FILE).read_text(encoding="utf-8")
        return version, text

    def search(self, where: Mapping[str, str] | None = None, kind: ArtifactKind | None = None,
               name: str | None = None) -> list[ArtifactVersion]:
        """Versions whose metadata or lineage match every ``key=value`` in ``where``.

        Keys name a metadata key, a lineage field (``pipeline_config_hash``, ``training_run_id``,
        ``base_model``, ...), or ``metrics.NAME`` (compared as numbers).
        """
        found = []
        for candidate_name in [name] if name else self.names():
            for version in self.versions(candidate_name):
                if (kind is None or version.kind == kind) and _matches(version, where or {}):
                    found.append(version)
        return found

    # ---- helpers ----------------------------------------------------------------------------------

    def _alias_holder(self, name: str, alias: str) -> int | None:
        stack = _promotion_stack(self.alias_moves(name, alias))
        return stack[-1] if stack else None

    def _kind_of(self, name: str) -> ArtifactKind | None:
        if name not in self.names():
            return None
        versions = self.versions(name)
        return versions[0].kind if versions else None

    def _version_list(self, name: str) -> str:
        numbers = [v.version for v in self.versions(name)]
        return f"versions {numbers[0]}..{numbers[-1]}" if numbers else "no versions"


def _promotion_stack(moves: list[AliasMove]) -> list[int]:
    """The versions an alias has been promoted to, with rolled-back promotions popped; top = current."""
    stack: list[int] = []
    for move in moves:
        if move.rollback:
            if stack:
                stack.pop()
        else:
            stack.append(move.version)
    return stack


def _matches(version: ArtifactVersion, where: Mapping[str, str]) -> bool:
    lineage = version.lineage.to_dict()
    for key, wanted in where.items():
        if key.startswith("metrics."):
            value = version.lineage.metrics.get(key.removeprefix("metrics."))
            try:
                if value is None or value != float(wanted):
                    return False
            except ValueError:
                return False
        elif key in version.metadata:
            if version.metadata[key] != wanted:
                return False
        elif key in lineage and key not in ("metrics", "extra"):
            value = lineage[key]
            if (wanted not in value) if isinstance(value, list) else (str(value) != wanted):
                return False
        else:
            return False
    return True


def open_registry(location: str | Path | None = None) -> Registry:
    """The registry at ``location`` (default: ``$TRACELEARN_REGISTRY`` or ``~/.cache/tracelearn/registry``)."""
    where = str(location) if location is not None else default_registry_location()
    if where.startswith("mlflow+"):
        from tracelearn.registry.mlflow_backend import MlflowRegistry

        return MlflowRegistry(where.removeprefix("mlflow+"))
    from tracelearn.registry.filesystem import FilesystemRegistry

    return FilesystemRegistry(where)
