"""Artifact registry: versioned prompts and checkpoints with aliases, an audit log and lineage.

Backends: a local directory or any pyarrow filesystem URI (``filesystem``, the default) and an MLflow
tracking server (``mlflow_backend``), behind one interface (``backend.Registry``); ``open_registry``
picks one from a location. ``prompts.prompt`` is what agents call to read a prompt by alias.

May import: tracelearn.storage (the directory fsync), tracelearn.settings, the standard library, pyarrow
filesystems (and mlflow for its backend). Used by training, serving and models; must never import any
of them.
"""

from tracelearn.registry.artifacts import (
    DEFAULT_ALIAS,
    LATEST_ALIAS,
    AliasConflictError,
    AliasMove,
    ArtifactNotFoundError,
    ArtifactRef,
    ArtifactVersion,
    CorruptArtifactError,
    InvalidArtifactError,
    InvalidReferenceError,
    Lineage,
    Published,
    RegistryError,
    RegistryWriteError,
)
from tracelearn.registry.backend import REGISTRY_ENV, Registry, open_registry

__all__ = [
    "DEFAULT_ALIAS",
    "LATEST_ALIAS",
    "REGISTRY_ENV",
    "AliasConflictError",
    "AliasMove",
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactVersion",
    "CorruptArtifactError",
    "InvalidArtifactError",
    "InvalidReferenceError",
    "Lineage",
    "Published",
    "Registry",
    "RegistryError",
    "RegistryWriteError",
    "open_registry",
]
