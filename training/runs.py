"""What every trainer does before its first step and after its last, so GRPO and SFT runs look alike.

:func:`start_run` checks the config, claims the run directory, reads the transitions, records what
was asked (``config.json``) and loads the policy. :func:`finish_run` saves the checkpoint, plots the
steps, writes the lineage and the summary (``summary.json`` last: its presence means the run
finished) and returns a :class:`TrainResult`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tracelearn.registry import Lineage, Registry
from tracelearn.training.config import TrainConfig, check_ranges, config_as_dict, train_config_hash
from tracelearn.training.data import TrainingData, load_training_data
from tracelearn.training.policy import Policy, load_policy, save_checkpoint
from tracelearn.training.run_dir import RunDirectory, code_revision, files_snapshot, plot_training
from tracelearn.training.sequences import SequenceCounts

__all__ = ["RunStart", "TrainResult", "TrainedSteps", "finish_run", "run_lineage", "start_run"]


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its directory, checkpoint, lineage and summary (also written to disk)."""

    run: RunDirectory
    checkpoint: Path
    lineage: Lineage
    summary: dict[str, Any]


@dataclass(frozen=True)
class RunStart:
    """A run ready for its first step: where it writes, what it reads, the policy, when it began."""

    trainer: str
    model: str
    config: TrainConfig
    run: RunDirectory
    data: TrainingData
    policy: Policy
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TrainedSteps:
    """What a trainer's loop did: the sequences it kept (and why others were left out), its steps,
    tokens and time, the training metrics for the lineage and anything the summary adds."""

    counts: SequenceCounts
    sequences: int
    steps: int
    epochs: int
    tokens: int
    seconds: float
    metrics: dict[str, Any]
    plot_title: str
    lineage_extra: dict[str, Any] = field(default_factory=dict)
    summary_extra: dict[str, Any] = field(default_factory=dict)


def start_run(trainer: str, transitions: str | Path, model: str, out: str | Path, config: TrainConfig, *,
              config_hash: str | None, overwrite: bool, registry: Registry | None = None) -> RunStart:
    """Validate, claim ``out`` (refusing a finished run unless ``overwrite``), read the data, load the policy
    (``registry`` resolves a ``registry:`` model; ``None``: the default registry)."""
    check_ranges(config)
    started = time.monotonic()
    run = RunDirectory.create(Path(out), overwrite=overwrite)
    data = load_training_data(transitions, config_hash)
    run.write_config({"trainer": trainer, "backend": "torch", "run_id": run.run_id, "model": model,
                      "transitions": str(data.root), "pipeline_config_hash": data.config_hash,
                      "partitions": list(data.partitions), "train_config": config_as_dict(config),
                      "train_config_hash": train_config_hash(config)})
    policy = load_policy(model, config.lora, config.runtime, registry=registry)
    return RunStart(trainer, model, config, run, data, policy, started)


def run_lineage(start: RunStart, metrics: dict[str, Any], extra: dict[str, Any]) -> Lineage:
    """The registry lineage of a run's checkpoint: data snapshot, configs, origin, code and training metrics."""
    policy, data = start.policy, start.data
    return Lineage(
        dataset=str(data.root.resolve()),
        partitions=data.partitions,
        dataset_snapshot=files_snapshot(data.files),
        pipeline_config_hash=data.config_hash,
        training_run_id=start.run.run_id,
        base_model=policy.base_reference,
        parent=policy.started_from.removeprefix("registry:"),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)},
        code_revision=code_revision(),
        extra={"trainer": start.trainer, "backend": "torch", "train_config_hash": train_config_hash(start.config),
               "lora": policy.lora, **extra},
    )


def finish_run(start: RunStart, trained: TrainedSteps) -> TrainResult:
    """Save the checkpoint, plot, lineage and summary of a run whose steps are done."""
    run, policy = start.run, start.policy
    checkpoint = save_checkpoint(policy, run.checkpoint_path)
    history = run.read_metrics()
    plot_training(history, run.plot_path, trained.plot_title)
    lineage = run_lineage(start, trained.metrics,
                          {"sequences": trained.sequences, "steps": trained.steps, **trained.lineage_extra})
    run.write_lineage(lineage)
    summary = {
        "trainer": start.trainer,
        "run_id": run.run_id,
        "model": start.model,
        "started_from": policy.started_from,
        "checkpoint": str(checkpoint),
        "lora": policy.lora,
        "precision": str(policy.autocast or torch.float32).removeprefix("torch."),
        "device": str(policy.device),
        "sequences": trained.counts.to_dict(),
        "steps": trained.steps,
        "epochs": trained.epochs,
        "train_tokens": trained.tokens,
        "train_seconds": trained.seconds,
        "tokens_per_second": trained.tokens / max(trained.seconds, 1e-9),
        "wall_seconds": time.monotonic() - start.started,
        "final": history[-1] if history else {},
        **trained.summary_extra,
    }
    run.write_summary(summary)
    return TrainResult(run, checkpoint, lineage, summary)
