"""Artifact registry: versioned prompts and checkpoints with aliases and lineage.

May import: the standard library, pyarrow filesystems (and mlflow for its backend). Used by
training and serving; must never import either of them.
"""
