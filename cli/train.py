"""``tracelearn train grpo|sft``: train the policy on a transitions dataset; write a run directory.

    tracelearn train grpo --transitions ./data --model registry:calc-policy@production --out ./runs/43 \\
        [--lora r=16] [--backend torch|verl] [--config train.yaml]
    tracelearn train sft --transitions ./data --min-reward 1.0 --model smollm2 --out ./runs/44

Flags override single keys of ``train.yaml`` (``--lr``, ``--epochs``, ``--lora``, ...). The run
directory holds the config, per-step metrics (JSONL), a plot, the checkpoint and its lineage,
ready for ``tracelearn registry publish checkpoint NAME RUN/checkpoint --lineage RUN/lineage.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from tracelearn.models import ModelLoadError, ModelNotFoundError
from tracelearn.registry import REGISTRY_ENV, RegistryError, open_registry
from tracelearn.schemas.dataset import DatasetError
from tracelearn.schemas.migrations import SchemaVersionError
from tracelearn.training.config import (
    TrainConfig,
    TrainConfigError,
    load_train_config,
    parse_lora_flag,
    with_overrides,
)
from tracelearn.training.data import NoTrainingDataError
from tracelearn.training.run_dir import RunDirectoryError

if TYPE_CHECKING:  # the trainers import torch: only the train subcommands pay for it
    from tracelearn.training.runs import TrainResult

# Errors a user can fix from the message alone: shown as one line, no traceback.
USER_ERRORS = (TrainConfigError, DatasetError, SchemaVersionError, NoTrainingDataError, RunDirectoryError,
               ModelNotFoundError, ModelLoadError, RegistryError, ValueError)


@click.group()
def train() -> None:
    """Train the policy (GRPO or SFT) on a transitions dataset."""


def _common(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--transitions", "transitions_path", required=True, type=click.Path(path_type=Path),
                     help="Transitions: a build output root, its transitions/ folder, or one file."),
        click.option("--model", required=True, help="Policy to start from: smollm2, a directory, registry:NAME@ALIAS."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory to create."),
        click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                     help="train.yaml (every key optional)."),
        click.option("--config-hash", default=None, help="Pipeline config hash prefix, when several were built."),
        click.option("--lora", default=None,
                     help="Train a LoRA adapter: 'on' or r=16,alpha=32,target_modules=q_proj+v_proj."),
        click.option("--lr", type=float, default=None, help="Learning rate."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Passes over the data."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:N."),
        click.option("--seed", type=int, default=None),
        click.option("--registry", default=None, help=f"Registry for registry: models (default ${REGISTRY_ENV})."),
        click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in --out."),
        click.option("--no-progress", is_flag=True, help="No progress bars (logs and CI)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _config(config_path: Path | None, section: str, lora: str | None, overrides: dict[str, Any]) -> TrainConfig:
    config = load_train_config(config_path)
    flags: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is not None:
            flags[key if "." in key else f"{section}.{key}"] = value
    if lora is not None:
        flags["lora"] = parse_lora_flag(lora)
    return with_overrides(config, flags) if flags else config


def render_result(result: TrainResult, console: Console) -> None:
    summary = result.summary
    table = Table(title=f"{summary['trainer']} run {summary['run_id']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    sequences = summary["sequences"]
    table.add_row("transitions read", str(sequences["transitions"]))
    table.add_row("sequences trained on", str(sequences["kept"]))
    for reason, count in sequences["dropped"].items():
        table.add_row(f"  left out: {reason.replace('_', ' ')}", str(count))
    table.add_row("retokenized (no server token ids)", str(sequences["retokenized"]))
    if "logprobs_recomputed" in summary:
        table.add_row("logprobs recomputed (none recorded)", str(summary["logprobs_recomputed"]))
    table.add_row("optimizer steps", str(summary["steps"]))
    table.add_row("precision / device", f"{summary['precision']} / {summary['device']}")
    table.add_row("throughput", f"{summary['tokens_per_second']:.0f} tokens/s")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    final = summary.get("final") or {}
    if isinstance(final.get("loss"), int | float):
        table.add_row("final loss", f"{final['loss']:.4f}")
    console.print(table)
    run = result.run
    console.print(f"checkpoint: {result.checkpoint}\nmetrics: {run.metrics_path}\nplot: {run.plot_path}")
    console.print(f"publish it: tracelearn registry publish checkpoint NAME {result.checkpoint} "
                  f"--lineage {run.lineage_path}", style="dim")


def _run(console: Console, action: Callable[[], TrainResult]) -> None:
    try:
        result = action()
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from error
    render_result(result, console)


@train.command("grpo")
@_common
@click.option("--backend", type=click.Choice(["torch", "verl"]), default="torch", show_default=True,
              help="torch: this process (CPU or one GPU); verl: export and launch a verl job (GPU cluster).")
@click.option("--verl-python", default=None, help="Python of verl's own environment (default $TRACELEARN_VERL_PYTHON).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs per node (verl).")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes (verl).")
@click.option("--prepare-only", is_flag=True,
              help="verl: write the job (data, overrides, launch.sh) without running it.")
def grpo_command(transitions_path: Path, model: str, out: Path, config_path: Path | None, config_hash: str | None,
                 lora: str | None, lr: float | None, epochs: int | None, precision: str | None, device: str | None,
                 seed: int | None, registry: str | None, overwrite: bool, no_progress: bool, backend: str,
                 verl_python: str | None, gpus: int, nodes: int, prepare_only: bool) -> None:
    """GRPO on stored transitions: clipped policy gradient with the recorded logprobs and advantages."""
    console = Console()
    try:
        config = _config(config_path, "grpo", lora, {"learning_rate": lr, "epochs": epochs,
                                                     "runtime.precision": precision, "runtime.device": device,
                                                     "runtime.seed": seed})
    except TrainConfigError as error:
        raise click.ClickException(str(error)) from error
    if backend == "verl":
        from tracelearn.cli.train_verl import run_verl

        run_verl(console, transitions_path, model, out, config, config_hash=config_hash, verl_python=verl_python,
                 gpus=gpus, nodes=nodes, prepare_only=prepare_only, registry=registry)
        return
    from tracelearn.training.grpo import train_grpo

    _run(console, lambda: train_grpo(transitions_path, model, out, config, config_hash=config_hash,
                                     overwrite=overwrite, progress=not no_progress,
                                     registry=open_registry(registry) if registry else None))


@train.command("sft")
@_common
@click.option("--min-reward", type=float, default=None,
              help="Keep transitions with at least this reward (default 1.0).")
def sft_command(transitions_path: Path, model: str, out: Path, config_path: Path | None, config_hash: str | None,
                lora: str | None, lr: float | None, epochs: int | None, precision: str | None, device: str | None,
                seed: int | None, registry: str | None, overwrite: bool, no_progress: bool,
                min_reward: float | None) -> None:
    """SFT on the transitions whose reward passes --min-reward (rejection-sampling fine-tuning)."""
    console = Console()
    try:
        config = _config(config_path, "sft", lora, {"learning_rate": lr, "epochs": epochs, "min_reward": min_reward,
                                                    "runtime.precision": precision, "runtime.device": device,
                                                    "runtime.seed": seed})
    except TrainConfigError as error:
        raise click.ClickException(str(error)) from error
    from tracelearn.training.sft import train_sft

    _run(console, lambda: train_sft(transitions_path, model, out, config, config_hash=config_hash,
                                    overwrite=overwrite, progress=not no_progress,
                                    registry=open_registry(registry) if registry else None))
