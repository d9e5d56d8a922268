"""How a registry version is written into MLflow tags, and read back: the ``tracelearn.*`` tag names,
long values split into chunks under MLflow's limits, and the alias log's param keys.

A version's kind, format, digest, creation time, manifest, lineage and metadata are its MLflow version's
tags; the long JSON ones are split into 4,000-character chunks (``KEY.chunks`` = count, ``KEY.0``,
``KEY.1``...), since registered-model tags are VARCHAR(5000) on MySQL/PostgreSQL and a prompt's
version tags are copied onto the prompt itself. Tags that do not read back (edited by hand) or no longer
match their digest raise ``CorruptArtifactError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from tracelearn.registry.artifacts import (
    ArtifactFormat,
    ArtifactKind,
    ArtifactVersion,
    CorruptArtifactError,
    FileEntry,
    Lineage,
    manifest_digest,
)

TAG_KIND = "tracelearn.kind"
TAG_FORMAT = "tracelearn.format"
TAG_DIGEST = "tracelearn.digest"
TAG_CREATED = "tracelearn.created_at"
TAG_MANIFEST = "tracelearn.manifest"
TAG_LINEAGE = "tracelearn.lineage"
TAG_METADATA = "tracelearn.metadata"
TAG_ALIAS_LOG_RUN = "tracelearn.alias_log_run"
TAG_ALIAS_LOG_FOR = "tracelearn.alias_log_for"
PROMPT_MARKER_TAG = "mlflow.prompt.is_prompt"  # how MLflow (open source) tells prompts from models

TAG_CHUNK_CHARS = 4000
_KINDS: dict[str, ArtifactKind] = {"prompt": "prompt", "checkpoint": "checkpoint"}
_FORMATS: dict[str, ArtifactFormat] = {"text": "text", "hf": "hf", "lora": "lora", "gguf": "gguf"}


def artifact_kind(tags: Mapping[str, str]) -> ArtifactKind | None:
    """The kind a registered model's or prompt's tags say (``None``: not published by tracelearn)."""
    return _KINDS.get(tags.get(TAG_KIND, ""))


def version_tags(kind: ArtifactKind, format_: str, digest: str, created_at: str, files: Sequence[FileEntry],
                 lineage: Lineage, metadata: Mapping[str, str]) -> dict[str, str]:
    """The tags of a new version."""
    tags = {TAG_KIND: kind, TAG_FORMAT: format_, TAG_DIGEST: digest, TAG_CREATED: created_at}
    tags.update(chunked(TAG_MANIFEST, json.dumps([[f.path, f.size, f.sha256] for f in files])))
    tags.update(chunked(TAG_LINEAGE, json.dumps(lineage.to_dict(), sort_keys=True)))
    tags.update(chunked(TAG_METADATA, json.dumps(dict(metadata), sort_keys=True)))
    return tags


def version_from_tags(name: str, kind: ArtifactKind, number: int, tags: Mapping[str, str],
                      server: str) -> ArtifactVersion | None:
    """Version ``number`` of ``name`` from its tags (``None``: registered by hand, no digest tag);
    ``server`` names where it was read in errors."""
    if TAG_DIGEST not in tags:
        return None
    ref = f"{name}@{number}"
    try:
        manifest = json.loads(joined(tags, TAG_MANIFEST))
        files = tuple(FileEntry(path, int(size), sha) for path, size, sha in manifest)
        lineage = Lineage.from_dict(json.loads(joined(tags, TAG_LINEAGE)), source=f"{ref} lineage tag")
        metadata = {str(k): str(v) for k, v in json.loads(joined(tags, TAG_METADATA)).items()}
    except (KeyError, ValueError, TypeError) as error:
        raise CorruptArtifactError(f"{ref} in {server} has unreadable tracelearn tags "
                                   f"({error}); they were edited by hand: republish the artifact") from error
    if manifest_digest(files) != tags[TAG_DIGEST]:
        raise CorruptArtifactError(f"{ref} in {server}: its manifest tags do not match its "
                                   f"digest {tags[TAG_DIGEST][:16]}...; they were edited: republish the artifact")
    return ArtifactVersion(
        name=name, version=number, kind=kind,
        format=_FORMATS.get(tags.get(TAG_FORMAT, ""), "text" if kind == "prompt" else "hf"),
        digest=tags[TAG_DIGEST], files=files, created_at=tags.get(TAG_CREATED, ""),
        lineage=lineage, metadata=metadata,
    )


def move_key(alias: str, sequence: int) -> str:
    return f"alias/{alias}/{sequence:09d}"


def chunked(key: str, value: str) -> dict[str, str]:
    if len(value) <= TAG_CHUNK_CHARS:
        return {key: value}
    parts = [value[start:start + TAG_CHUNK_CHARS] for start in range(0, len(value), TAG_CHUNK_CHARS)]
    return {f"{key}.chunks": str(len(parts)), **{f"{key}.{index}": part for index, part in enumerate(parts)}}


def joined(tags: Mapping[str, str], key: str) -> str:
    if key in tags:
        return tags[key]
    return "".join(tags[f"{key}.{index}"] for index in range(int(tags[f"{key}.chunks"])))
