"""One training job in steps, as the ``tracelearn_train`` DAG runs them: each step is one call here.

1. :func:`check_training_inputs`: the train config, the transitions and the registry, checked before
   any model loads (what a failed run would otherwise find out after loading one).
2. Training in this process (:func:`train_policy`: GRPO or SFT by name, what ``tracelearn loop`` uses
   too), or verl's job: :func:`prepare_verl_training` writes it (the model resolved in the registry
   given), verl's environment runs its ``launch.sh``, and :func:`verl_training_result` finds its last
   checkpoint and writes the lineage a torch run writes itself (``lineage.json`` in the run directory).
3. Publishing, evaluating and gating the checkpoint: ``tracelearn.training.gate``.

Every step raises the library's own errors (``TrainConfigError``, ``DatasetError``,
``NoTrainingDataError``, ``RegistryError``, ``VerlJobError``, ...); the outer layer renders them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracelearn.registry import Lineage, Registry
from tracelearn.training.config import (
    TrainConfig,
    load_train_config,
    parse_lora_flag,
    train_config_hash,
    with_overrides,
)
from tracelearn.training.data import load_training_data
from tracelearn.training.run_dir import code_revision, files_snapshot

if TYPE_CHECKING:
    from tracelearn.training.runs import TrainResult

__all__ = [
    "TRAINERS",
    "TrainingInputs",
    "check_training_inputs",
    "prepare_verl_training",
    "train_config_from",
    "train_policy",
    "verl_training_result",
]

TRAINERS: tuple[str, ...] = ("grpo", "sft")


@dataclass(frozen=True)
class TrainingInputs:
    """What the checks found: the pipeline config hash of the chosen transitions, the train config's
    hash, and how many transitions there are."""

    config_hash: str
    train_config_hash: str
    rows: int


def train_config_from(path: str | Path | None, lora: str | None = None) -> TrainConfig:
    """``train.yaml`` (``None``: the defaults) with ``lora`` (the ``--lora`` flag's text, e.g. ``r=16``) on top."""
    config = load_train_config(path)
    return with_overrides(config, {"lora": parse_lora_flag(lora)}) if lora else config


def check_training_inputs(transitions: str | Path, config_hash: str | None, config: TrainConfig,
                          registry: Registry) -> TrainingInputs:
    """Read the transitions (``config_hash``: a prefix choosing among several pipeline configs) and list
    the registry; raises ``DatasetError``, ``NoTrainingDataError`` or ``RegistryError`` naming the problem."""
    data = load_training_data(transitions, config_hash)
    registry.names()
    return TrainingInputs(data.config_hash, train_config_hash(config), data.frame.height)


def train_policy(trainer: str, transitions: str | Path, model: str, out: str | Path, config: TrainConfig, *,
                 config_hash: str | None, registry: Registry, overwrite: bool = False,
                 progress: bool = True) -> TrainResult:
    """Train ``model`` with ``trainer`` (``grpo`` or ``sft``) in this process into the run directory ``out``."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer {trainer!r} is unknown; use one of {', '.join(TRAINERS)}")
    # torch loads here, not when the outer layers import this module.
    from tracelearn.training.grpo import train_grpo
    from tracelearn.training.sft import train_sft

    train = train_grpo if trainer == "grpo" else train_sft
    return train(transitions, model, out, config, config_hash=config_hash, overwrite=overwrite, progress=progress,
                 registry=registry)


def prepare_verl_training(transitions: str | Path, run: str | Path, model: str, config: TrainConfig, *,
                          config_hash: str | None, registry: Registry) -> Path:
    """Write verl's job (its data, overrides and ``launch.sh``) under ``run``, for ``model`` resolved in
    ``registry``; returns the job's directory."""
    from tracelearn.training.verl_backend import prepare_verl_job, verl_model_path

    model_path = verl_model_path(model, registry)
    job = prepare_verl_job(Path(transitions), Path(run), model_path, config, config_hash=config_hash)
    return job.paths.directory


def verl_training_result(job_directory: str | Path, run: str | Path, transitions: str | Path, *, model: str,
                         config_hash: str, train_config_hash: str, lora: bool) -> tuple[Path, Path]:
    """The finished verl job's last checkpoint, and ``run/lineage.json``: the lineage naming the data it
    trained on (snapshot, pipeline config hash), the model it started from and the train config."""
    from tracelearn.training.verl_checkpoints import latest_verl_checkpoint

    checkpoint = latest_verl_checkpoint(Path(job_directory), lora=lora)
    data = load_training_data(transitions, config_hash)
    extra: dict[str, Any] = {"trainer": "grpo", "backend": "verl", "train_config_hash": train_config_hash}
    lineage = Lineage(
        dataset=str(data.root), partitions=data.partitions, dataset_snapshot=files_snapshot(data.files),
        pipeline_config_hash=data.config_hash, training_run_id=Path(run).name, base_model=model,
        parent=model.removeprefix("registry:"), code_revision=code_revision(), extra=extra,
    )
    path = Path(run) / "lineage.json"
    path.write_text(json.dumps(lineage.to_dict(), indent=2), encoding="utf-8")
    return checkpoint, path
