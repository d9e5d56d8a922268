"""``tracelearn train grpo --backend verl``: write the verl job from the transitions, run it in verl's environment.

verl loads the policy itself on every worker, from a Hugging Face model directory: a ``registry:``
reference is resolved to its (checksum-verified) local files first; GGUF weights and LoRA adapter
versions cannot be given to verl as they are.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from tracelearn.models import ModelNotFoundError
from tracelearn.registry import RegistryError, open_registry
from tracelearn.training.config import TrainConfig
from tracelearn.training.verl_backend import (
    VerlCheckpointError,
    VerlJobError,
    latest_verl_checkpoint,
    prepare_verl_job,
    verl_model_path,
)
from tracelearn.training.verl_environment import VerlNotAvailableError, find_verl_python
from tracelearn.training.verl_runtime import run_verl_job, verl_command


def run_verl(console: Console, transitions: Path, model: str, out: Path, config: TrainConfig, *,
             config_hash: str | None, verl_python: str | None, gpus: int, nodes: int, prepare_only: bool,
             registry: str | None = None) -> None:
    """Write the job under ``out/verl/`` and, unless ``prepare_only``, run it; a failed job is a ClickException."""
    try:
        model_path = verl_model_path(model, open_registry(registry) if registry else None)
        python = None if prepare_only else find_verl_python(verl_python)
        with console.status("exporting the transitions for verl..."):
            job = prepare_verl_job(transitions, out, model_path, config, n_gpus_per_node=gpus, nnodes=nodes,
                                   config_hash=config_hash)
    except (VerlJobError, VerlNotAvailableError, ModelNotFoundError, RegistryError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    console.print(f"verl job: {job.paths.directory} ({job.data.train_rows} training rows; "
                  f"left out: {dict(job.skipped) or 'none'})")
    console.print(f"launch script: {job.paths.launch_script}")
    if python is None:
        console.print("prepared only; run it on a GPU machine with: " + str(job.paths.launch_script), style="dim")
        return
    console.print("$ " + " ".join(verl_command(job, python)[:3]) + " ...", style="dim")
    status = run_verl_job(job, python, out / "verl.log")
    if status != 0:
        raise click.ClickException(
            f"the verl job exited with status {status}; its logs: {out / 'verl.log'}"
            + (f", {out / 'merge.log'}" if job.lora else "")
        )
    try:
        weights = latest_verl_checkpoint(job.paths.directory, lora=job.lora)
    except VerlCheckpointError as error:
        raise click.ClickException(str(error)) from error
    console.print(f"verl checkpoint ({'LoRA adapter' if job.lora else 'model'}): {weights}")
