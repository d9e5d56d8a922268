"""What a finished verl job leaves behind: the weights of its last step, and the LoRA adapter checked
against the model the job trained.

verl 0.9.1 (``verl/utils/checkpoint/fsdp_checkpoint_manager.py``) saves ``checkpoints/global_step_N/
actor/`` as FSDP shards plus ``huggingface/`` (the model's config and tokenizer, and with
``save_contents`` holding ``hf_model`` its full weights) and, for LoRA, ``lora_train_meta.json``. It
writes no adapter directory (verl <= 0.7 wrote ``actor/lora_adapter/``): the adapter comes from
verl's model merger, ``python -m verl.model_merger merge --backend fsdp --local_dir ACTOR
--target_dir ACTOR/merged`` (:func:`merge_command`), as ``merged/lora_adapter/``. Its
``adapter_config.json`` names no base model, so :func:`latest_verl_checkpoint` checks the adapter
against the job's ``job.json`` (rank, alpha, the trained model's architecture) and records the
job's base model in it; both layouts are accepted.

May import: the standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "JOB_FILE",
    "MERGED",
    "VerlCheckpointError",
    "actor_directory",
    "latest_step",
    "latest_verl_checkpoint",
    "merge_command",
]

JOB_FILE = "job.json"
CHECKPOINTS = "checkpoints"
MERGED = "merged"  # the model merger's target directory, inside the actor checkpoint
ADAPTER = "lora_adapter"
ADAPTER_CONFIG = "adapter_config.json"
# What must agree between the trained model's config and the base model's for an adapter to fit it.
_ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class VerlCheckpointError(ValueError):
    """A finished job has no usable checkpoint: names the directory or file and what to do."""


def latest_step(job_directory: Path) -> Path:
    """``checkpoints/global_step_N`` with the highest N; :class:`VerlCheckpointError` when there is none."""
    checkpoints = job_directory / CHECKPOINTS
    steps = sorted(
        (int(path.name.removeprefix("global_step_")), path)
        for path in checkpoints.glob("global_step_*")
        if path.name.removeprefix("global_step_").isdigit()
    )
    if not steps:
        raise VerlCheckpointError(f"{checkpoints}: the verl job saved no checkpoint (no global_step_N directory)")
    return steps[-1][1]


def actor_directory(job_directory: Path) -> Path:
    """The actor checkpoint of the job's last step (what the model merger reads)."""
    return latest_step(job_directory) / "actor"


def merge_command(python: str, actor: Path) -> list[str]:
    """verl's model merger over ``actor``, writing ``actor/merged/`` (with ``lora_adapter/`` for LoRA)."""
    return [python, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
            "--local_dir", str(actor), "--target_dir", str(actor / MERGED)]


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise VerlCheckpointError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(value, dict):
        raise VerlCheckpointError(f"{path} holds {type(value).__name__}, expected an object")
    return value


def _check_architecture(trained: Path, base_model: str) -> None:
    """Refuse a checkpoint whose model config differs from the base model's (when the base is a local directory)."""
    base_config = Path(base_model).expanduser() / "config.json"
    if not (trained / "config.json").is_file() or not base_config.is_file():
        return  # a hub id, or an older layout without the config: nothing local to compare
    saved, base = _json(trained / "config.json"), _json(base_config)
    differ = [f"{key}: {saved.get(key)!r} vs {base.get(key)!r}" for key in _ARCHITECTURE_KEYS
              if saved.get(key) != base.get(key)]
    if differ:
        raise VerlCheckpointError(
            f"{trained} was trained on another model than {base_model} ({'; '.join(differ)}); "
            "publish it with the base model the job was written for"
        )


def _checked_adapter(adapter: Path, job: dict[str, Any], actor: Path) -> Path:
    """Check ``adapter`` against the job (rank, alpha, base model) and record the base model in its config."""
    config_path = adapter / ADAPTER_CONFIG
    config = _json(config_path)
    lora = job.get("lora") or {}
    base_model = str(job["model_path"])
    problems = []
    if lora and config.get("r") != lora.get("r"):
        problems.append(f"rank r={config.get('r')!r}, the job trained r={lora.get('r')}")
    if lora and config.get("lora_alpha") != lora.get("alpha"):
        problems.append(
            f"lora_alpha={config.get('lora_alpha')!r}, the job trained alpha={lora.get('alpha')} (an alpha of 0 means "
            "the merger found no lora_train_meta.json)"
        )
    named = config.get("base_model_name_or_path")
    if named not in (None, "", base_model):
        problems.append(f"base_model_name_or_path={named!r}, the job trained {base_model!r}")
    if problems:
        raise VerlCheckpointError(f"{config_path}: the adapter does not match {JOB_FILE}: " + "; ".join(problems))
    _check_architecture(actor / "huggingface", base_model)
    if named != base_model:
        config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return adapter


def latest_verl_checkpoint(job_directory: Path, lora: bool) -> Path:
    """The weights of a finished job's last step.

    Full fine-tuning: ``checkpoints/global_step_N/actor/huggingface`` (it must hold weights). LoRA: the
    merger's ``actor/merged/lora_adapter`` (verl >= 0.8; ``launch.sh`` runs the merger) or verl 0.7's
    ``actor/lora_adapter``, checked against ``job.json`` (rank, alpha, the trained model's
    architecture against the base model's) and given the job's base model as
    ``base_model_name_or_path``. :class:`VerlCheckpointError` when there is none or it does not fit.
    """
    actor = actor_directory(job_directory)
    if not lora:
        weights = actor / "huggingface"
        if not any(next(weights.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
            raise VerlCheckpointError(
                f"{weights} holds no model weights: the job ran without hf_model in "
                "actor_rollout_ref.actor.checkpoint.save_contents; write the job again with tracelearn"
            )
        _check_architecture(weights, str(_json(job_directory / JOB_FILE)["model_path"]))
        return weights
    for adapter in (actor / MERGED / ADAPTER, actor / ADAPTER):
        if (adapter / ADAPTER_CONFIG).is_file():
            return _checked_adapter(adapter, _json(job_directory / JOB_FILE), actor)
    raise VerlCheckpointError(
        f"{actor} holds no LoRA adapter ({MERGED}/{ADAPTER} nor {ADAPTER}): run verl's model merger, "
        f"`python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {actor / MERGED}` "
        "(launch.sh runs it after the job)"
    )
