"""The transitions a training run reads, and what the lineage says about them.

Both trainers start here: one pipeline config's transitions (``pipelines.stats.scan_transitions``
chooses the config hash), the exact files they came from (``part-<hash16>.parquet`` in each date
partition) and the partitions, so the lineage can name a content hash of precisely the data trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tracelearn.pipelines.build import output_file_name
from tracelearn.pipelines.stats import scan_transitions, transitions_directory
from tracelearn.schemas.dataset import DatasetError, dataset_files, hive_partition_values

__all__ = ["NoTrainingDataError", "TrainingData", "load_training_data"]


class NoTrainingDataError(ValueError):
    """Nothing to train on: no transitions, or none left after the trainer's filters (the message says which)."""


@dataclass(frozen=True)
class TrainingData:
    """One config's transitions, collected, with the files and partitions they were read from."""

    frame: pl.DataFrame
    root: Path
    config_hash: str
    files: tuple[Path, ...]
    partitions: tuple[str, ...]


def load_training_data(root: str | Path, config_hash: str | None = None) -> TrainingData:
    """The transitions under ``root`` (a build output root, its ``transitions/`` or one file).

    ``config_hash`` is a prefix choosing among several pipeline configs (required when there are
    several). Raises ``DatasetError`` (and its ``ConfigHashError``) for missing or ambiguous data,
    :class:`NoTrainingDataError` when the chosen config has no rows or none with a reward.
    """
    directory = transitions_directory(root)
    frame, chosen = scan_transitions(directory, config_hash)
    collected = frame.collect()
    if collected.height == 0:
        raise NoTrainingDataError(f"{directory}: pipeline config {chosen[:16]} has no transitions")
    if collected.get_column("reward").is_null().all():
        raise NoTrainingDataError(
            f"{directory}: none of the {collected.height} transitions of pipeline config {chosen[:16]} has a "
            "reward: set reward.function (module:function) in pipeline.yaml, or emit rewards from the agent, "
            "and rebuild with `tracelearn transitions build`"
        )
    if directory.is_file():
        files: list[Path] = [directory]
    else:
        wanted = output_file_name(chosen)
        files = [p for p in dataset_files(directory) if p.name == wanted]
        if not files:
            raise DatasetError(f"{directory}: no {wanted} files although the scan found rows of that config")
    partitions = sorted(
        {"/".join(f"{k}={v}" for k, v in hive_partition_values(p, directory).items()) for p in files} - {""}
    )
    return TrainingData(collected, directory, chosen, tuple(files), tuple(partitions))
