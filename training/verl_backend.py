"""The verl backend: the transitions replayed by verl's PPO trainer, as a job in verl's own environment.

Owns the job directory ``OUT/verl/`` and what runs there:

- ``train.parquet`` / ``val.parquet``: verl-replay rows (``tracelearn.pipelines.export_verl``), the
  RL columns verl's ``RLHFDataset`` reads plus one struct column, ``tracelearn_replay``, holding the
  stored ``prompt_ids``, ``response_ids``, ``response_mask``, ``response_logprobs`` and
  ``advantage`` of every replayable transition (one name verl never uses: see ``verl_replay_loop``);
- ``python/tracelearn_replay_loop.py`` (a copy of ``tracelearn.training.verl_replay_loop``) and
  ``agent_loop.yaml`` naming it: the agent loop that returns those stored tokens instead of sampling;
- ``overrides.txt``, ``job.json`` (the model, LoRA settings and verl version the job was written for)
  and an executable ``launch.sh``: checks the verl version, runs ``python -m verl.trainer.main_ppo``
  with the Hydra overrides mapped from ``train.yaml`` (``tracelearn.training.verl_overrides``), then, with LoRA,
  ``python -m verl.model_merger merge`` into ``checkpoints/global_step_N/actor/merged/``;
- ``checkpoints/`` (verl writes ``global_step_N/actor/``; ``huggingface/`` holds the weights of a
  full fine-tuning, the merger's ``merged/lora_adapter/`` the adapter of a LoRA run) and ``hydra/``.

verl pins its own torch and vLLM, so it never shares tracelearn's environment: :func:`prepare_verl_job`
needs no verl (and no GPU), :func:`find_verl_python` finds the Python of verl's environment and
checks its version (``VERL_VERSIONS``; ``VERL_PIN`` is the release tested), and :func:`run_verl_job`
runs the job there as a child process. verl's Ray workers import the replay loop through the
``PYTHONPATH`` the job sets, which a single-node run passes on to them; with ``nnodes > 1`` the job
directory must be on storage every node sees, and each node's ``ray start`` needs the same
``PYTHONPATH``.

The training is the torch trainer's (``tracelearn.training.grpo``): the advantages are the ones
stored in the transitions (verl's GRPO estimator passes them through, see ``verl_replay_loop``),
``rollout.n`` is 1 (each transition is replayed once), one PPO step covers every training row by
default and ``ppo_epochs`` is ``grpo.epochs``, so ``pi_old`` is fixed for the whole run and every
epoch steps through the mini-batches of ``grpo.mini_batch_size`` rows. Where verl differs, the
difference is stated: its mini-batches keep one order across epochs (the torch trainer reshuffles
each epoch); the rows past the last whole mini-batch are not trained (verl's dataloader drops
them); transitions without the server's token ids cannot be replayed (the torch trainer
retokenizes them); one training row without logprobs makes verl recompute ``pi_old`` for all
(see :func:`uses_stored_logprobs`); verl computes logprobs at one temperature for the whole job, which
the job takes from the training rows (refusing rows sampled at several, :func:`replay_temperature`),
and neither weighs transitions of another model version nor drops truncated sampling (the torch
trainer's ``off_policy`` and ``sampling`` settings). Settings verl cannot express are refused
(:class:`VerlJobError`), not dropped: ``grpo.warmup_steps`` (verl steps its scheduler once per PPO
step), ``lora.dropout`` (verl builds its adapter without dropout), ``runtime.precision: fp32`` (verl
trains in bf16 with fp32 master weights, our ``auto``/``bf16``), a non-CUDA ``runtime.device``.

Checked against the released verl 0.9.1 (the wheel's own files): the keys and defaults of
``verl/trainer/config/_generated_ppo_trainer.yaml``, ``verl/trainer/main_ppo.py`` (``trainer.use_v1``
picks the V1 trainer, the default since 0.9.0), ``verl/trainer/ppo/v1/trainer_base.py`` and
``agent_loop_tq.py`` (dataloader ``drop_last``, bypass mode, ``calculate_log_probs``, how dataset
columns reach the sample), ``verl/workers/utils/losses.py`` and ``verl/trainer/ppo/core_algos.py``
(``agg_loss`` with ``loss_scale_factor``, the GRPO advantage of a group of one, ``low_var_kl``),
``verl/utils/checkpoint/fsdp_checkpoint_manager.py`` and ``verl/model_merger/`` (checkpoint layout,
the LoRA adapter). ``tests/contracts/`` composes verl's own config with these overrides.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from tracelearn.models import REGISTRY_PREFIX, resolve_model
from tracelearn.pipelines.export_verl import (
    TRAIN,
    VALIDATION,
    VerlExport,
    load_transitions,
    replay_field,
    to_verl_replay,
    write_verl_export,
)
from tracelearn.registry import Registry
from tracelearn.training import verl_replay_loop
from tracelearn.training.config import TrainConfig, train_config_hash
from tracelearn.training.verl_checkpoints import (
    JOB_FILE,
    MERGED,
    VerlCheckpointError,
    latest_verl_checkpoint,
    merge_command,
)
from tracelearn.training.verl_environment import VERL_PIN, VERL_PYTHON_ENV, verl_version_check
from tracelearn.training.verl_overrides import (
    DEFAULT_PROJECT,
    ReplayData,
    VerlJobError,
    VerlPaths,
    uses_stored_logprobs,
    verl_overrides,
)

__all__ = [
    "VERL_ENTRY_POINT",
    "ReplayData",
    "VerlCheckpointError",
    "VerlJob",
    "VerlJobError",
    "VerlPaths",
    "latest_verl_checkpoint",
    "prepare_verl_job",
    "uses_stored_logprobs",
    "verl_overrides",
]

VERL_ENTRY_POINT = "verl.trainer.main_ppo"
# The name under which the copied agent loop is importable in verl's processes.
REPLAY_MODULE = "tracelearn_replay_loop"
# Rows dropped before the export is written, by reason (added to the export's own ``skipped``).
_WITHOUT_ADVANTAGE = "without_advantage"
_ZERO_ADVANTAGE = "zero_advantage"
_EMPTY_TOKENS = "empty_token_ids"
_TOO_LONG = "longer_than_max_sequence_tokens"
# Below this an advantage is a zero (a group whose rollouts all scored the same), as in training.grpo.
ZERO_ADVANTAGE = 1e-12


def verl_model_path(model: str, registry: Registry | None = None) -> str:
    """A local Hugging Face directory (or hub id) verl can load for ``model``; ``registry`` resolves a
    ``registry:`` reference (to its checksum-verified local files).

    Raises :class:`VerlJobError` for what verl cannot load as it is: GGUF weights, a LoRA adapter version.
    """
    if not model.startswith(REGISTRY_PREFIX) and not Path(model).expanduser().exists():
        return model  # a hub id: verl's workers read it from their own Hugging Face cache
    source = resolve_model(model, registry=registry)
    if source.gguf_file is not None:
        raise VerlJobError(
            f"{model} is a GGUF file; verl loads Hugging Face safetensors directories. Train one torch step "
            "(tracelearn train ... --backend torch) or convert the model, and pass that directory"
        )
    if source.base is not None:
        raise VerlJobError(f"{model} is a LoRA adapter; give verl its base model and set lora in train.yaml instead")
    return str(source.directory)


@dataclass(frozen=True)
class VerlJob:
    """A prepared verl job: its files, the model it trains, its command-line overrides and environment.

    ``environment`` holds the variables the job adds to the caller's (``PYTHONPATH`` for the replay
    loop). ``skipped`` counts the transitions left out, by reason. ``stored_logprobs_as_old``: the
    stored logprobs are ``pi_old`` (verl's bypass mode); else verl recomputes them. ``lora``: the job
    trains a LoRA adapter (verl's model merger runs after it).
    """

    paths: VerlPaths
    model_path: str
    overrides: tuple[str, ...]
    environment: Mapping[str, str]
    data: ReplayData
    skipped: Mapping[str, int] = field(default_factory=dict)
    stored_logprobs_as_old: bool = False
    lora: bool = False


def _replayable_rows(export: VerlExport, config: TrainConfig) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """The rows verl can replay and the count of the others, by reason (on top of the export's)."""
    skipped = dict(export.skipped)
    reasons: list[tuple[str, pl.Expr]] = [
        (_WITHOUT_ADVANTAGE, replay_field("advantage").is_null() | replay_field("advantage").is_nan()),
        (_EMPTY_TOKENS, (replay_field("prompt_ids").list.len() == 0) | (replay_field("response_ids").list.len() == 0)),
    ]
    # As the torch trainer: a zero advantage carries no gradient unless a KL term pulls on the sequence.
    if config.grpo.skip_zero_advantage and config.grpo.kl_beta == 0:
        reasons.append((_ZERO_ADVANTAGE, replay_field("advantage").abs() <= ZERO_ADVANTAGE))
    if config.runtime.max_sequence_tokens is not None:
        length = replay_field("prompt_ids").list.len() + replay_field("response_ids").list.len()
        reasons.append((_TOO_LONG, length > config.runtime.max_sequence_tokens))
    splits = dict(export.splits)
    for reason, condition in reasons:
        drop = condition.fill_null(False)
        skipped[reason] = sum(rows.filter(drop).height for rows in splits.values())
        splits = {name: rows.filter(~drop) for name, rows in splits.items()}
    return splits, skipped


def _check_lengths(rows: pl.DataFrame) -> None:
    """Refuse (naming the span) a row whose mask or logprobs do not match its response tokens."""
    response = replay_field("response_ids").list.len()
    logprobs = replay_field("response_logprobs")
    mask_differs = replay_field("response_mask").list.len() != response
    bad = rows.filter(mask_differs | (logprobs.is_not_null() & (logprobs.list.len() != response)))
    if bad.height:
        span = bad["extra_info"].struct.field("span_id")[0]
        raise VerlJobError(
            f"{bad.height} transitions have a loss mask or logprobs whose length differs from their response "
            f"token ids (first: span {span}); rebuild the transitions"
        )


def replay_temperature(train: pl.DataFrame) -> float:
    """The one temperature the training rows were sampled at (unknown, or 0 for greedy, counts as 1, as in
    the torch trainer); raises :class:`VerlJobError` with the count of each when they differ, since verl
    divides every row's logits by one temperature."""
    effective = replay_field("temperature").fill_null(1.0)
    effective = pl.when(effective > 0).then(effective).otherwise(1.0)
    counts = train.group_by(effective.alias("temperature")).len().sort("temperature")
    if counts.height > 1:
        listed = ", ".join(f"{row['len']} at {row['temperature']:g}" for row in counts.iter_rows(named=True))
        raise VerlJobError(
            f"the training transitions were sampled at {counts.height} temperatures ({listed}; unknown counts as "
            "1); verl computes logprobs at one temperature per job: export and train each temperature apart "
            "(filter the transitions by their temperature column), or use the torch trainer, which reads each "
            "transition's own"
        )
    return float(counts["temperature"][0]) if counts.height else 1.0


def _replay_data(splits: Mapping[str, pl.DataFrame]) -> ReplayData:
    both = pl.concat([splits[TRAIN], splits[VALIDATION]])
    train = splits[TRAIN]
    return ReplayData(
        temperature=replay_temperature(train),
        train_rows=train.height,
        val_rows=splits[VALIDATION].height,
        max_prompt_tokens=int(both.select(replay_field("prompt_ids").list.len().max()).item() or 0),
        max_response_tokens=int(both.select(replay_field("response_ids").list.len().max()).item() or 0),
        train_rows_without_logprobs=train.select(replay_field("response_logprobs").null_count()).item(),
    )


def _launch_script(paths: VerlPaths, overrides: list[str], environment: Mapping[str, str], lora: bool) -> str:
    """The job as a shell script for verl's environment: version check, training, then (LoRA) the merger."""
    lines = [
        "#!/usr/bin/env bash",
        "# Written by tracelearn.training.verl_backend: replays the transitions in train.parquet with verl.",
        f"# Runs in verl's own environment (verl {VERL_PIN}): set {VERL_PYTHON_ENV} to its python (CUDA GPUs).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(paths.directory))}",
    ]
    lines += [f"export {name}={shlex.quote(value)}${{{name}:+:${{{name}}}}}" for name, value in environment.items()]
    lines += [
        f'PYTHON="${{{VERL_PYTHON_ENV}:?set {VERL_PYTHON_ENV} to the python of the verl environment}}"',
        f'"$PYTHON" -c {shlex.quote(verl_version_check())} >/dev/null',
    ]
    command = [f'"$PYTHON" -m {VERL_ENTRY_POINT}'] + [f"  {shlex.quote(item)}" for item in overrides]
    lines.append(" \\\n".join(command))
    if lora:
        # verl >= 0.8 saves no adapter directory: its model merger writes merged/lora_adapter/.
        merge = merge_command('"$PYTHON"', Path("$ACTOR"))
        lines += [
            f'ACTOR="$(ls -d {shlex.quote(str(paths.checkpoints))}/global_step_* | sort -V | tail -n 1)/actor"',
            " ".join([*merge[:-4], '--local_dir "$ACTOR"', f'--target_dir "$ACTOR/{MERGED}"']),
        ]
    return "\n".join(lines) + "\n"


def prepare_verl_job(
    transitions: Path,
    out: Path,
    model_path: str,
    config: TrainConfig,
    *,
    n_gpus_per_node: int = 1,
    nnodes: int = 1,
    config_hash: str | None = None,
    val_fraction: float = 0.0,
    batch_rows: int | None = None,
    project_name: str = DEFAULT_PROJECT,
    experiment_name: str | None = None,
) -> VerlJob:
    """Export the replayable transitions under ``out/verl/`` and write the job that trains on them there.

    ``transitions`` is a build output (or its ``transitions/``) holding one pipeline config, or the one
    ``config_hash`` (a prefix) picks. ``model_path`` (a local directory or Hugging Face id, loaded by
    every verl worker) must be the model whose tokenizer produced the stored token ids. Every
    transition trains unless ``val_fraction`` holds tasks out (into ``val.parquet``; verl's validation
    stays off: it would only replay stored scores). Left out and counted in ``VerlJob.skipped``: rows
    without token ids or with bad messages (the export's counts), without an advantage, with empty
    token ids, with an advantage of 0 under ``grpo.skip_zero_advantage`` (and no KL term), longer than
    ``runtime.max_sequence_tokens``. ``experiment_name`` defaults to ``replay-`` + the pipeline and
    train config hashes. Raises the export's ``ExportError`` for unreadable transitions and
    :class:`VerlJobError` when nothing is replayable or the settings cannot be honored.
    """
    paths = VerlPaths.under(out)
    export = to_verl_replay(load_transitions(transitions, config_hash), val_fraction=val_fraction)
    splits, skipped = _replayable_rows(export, config)
    if splits[TRAIN].height == 0:
        raise VerlJobError(
            f"{transitions}: no transition can be replayed for training (left out: {skipped}); verl replay needs the "
            "token ids and logprobs the model server returned (vLLM with return_token_ids, or the tracelearn gateway)"
        )
    for rows in splits.values():
        _check_lengths(rows)
    data = _replay_data(splits)
    pipeline_hash = str(splits[TRAIN]["extra_info"].struct.field("pipeline_config_hash")[0])
    name = experiment_name or f"replay-{pipeline_hash[:12]}-{train_config_hash(config)[:12]}"
    overrides = verl_overrides(
        config,
        model_path,
        paths,
        data,
        experiment_name=name,
        project_name=project_name,
        n_gpus_per_node=n_gpus_per_node,
        nnodes=nnodes,
        batch_rows=batch_rows,
    )

    paths.directory.mkdir(parents=True, exist_ok=True)
    write_verl_export(VerlExport(splits=splits, schema=export.schema), paths.directory)
    paths.python_directory.mkdir(exist_ok=True)
    shutil.copyfile(verl_replay_loop.__file__, paths.python_directory / f"{REPLAY_MODULE}.py")
    loop_entry = {
        "name": verl_replay_loop.AGENT_LOOP_NAME,
        "_target_": f"{REPLAY_MODULE}.ReplayAgentLoop",
        "replay_logprobs": data.all_train_rows_have_logprobs,
    }
    paths.agent_loop_config.write_text(yaml.safe_dump([loop_entry], sort_keys=False), encoding="utf-8")
    environment = {"PYTHONPATH": str(paths.python_directory)}
    paths.overrides_file.write_text("\n".join(overrides) + "\n", encoding="utf-8")
    lora = None if config.lora is None else {"r": config.lora.r, "alpha": config.lora.alpha}
    job_record = {"model_path": model_path, "lora": lora, "verl": VERL_PIN}
    (paths.directory / JOB_FILE).write_text(json.dumps(job_record, indent=2) + "\n", encoding="utf-8")
    launch = _launch_script(paths, overrides, environment, lora=config.lora is not None)
    paths.launch_script.write_text(launch, encoding="utf-8")
    paths.launch_script.chmod(0o755)
    return VerlJob(
        paths=paths,
        model_path=model_path,
        overrides=tuple(overrides),
        environment=environment,
        data=data,
        skipped=skipped,
        stored_logprobs_as_old=uses_stored_logprobs(config, data),
        lora=config.lora is not None,
    )
