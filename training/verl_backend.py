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
  with the Hydra overrides mapped from ``train.yaml`` (:func:`verl_overrides`), then, with LoRA,
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
(see :func:`uses_stored_logprobs`); and verl computes logprobs at one temperature for the whole job
(1.0), not at each transition's recorded one. Settings verl cannot express are refused
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
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from tracelearn.pipelines.export_verl import (
    TRAIN,
    VALIDATION,
    VerlExport,
    load_transitions,
    replay_field,
    to_verl_replay,
    write_verl_export,
)
from tracelearn.training import verl_replay_loop
from tracelearn.training.config import TrainConfig, check_ranges, train_config_hash
from tracelearn.training.verl_checkpoints import (
    JOB_FILE,
    MERGED,
    VerlCheckpointError,
    latest_verl_checkpoint,
    merge_command,
)
from tracelearn.training.verl_environment import VERL_PIN, VERL_PYTHON_ENV, verl_version_check

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
DEFAULT_PROJECT = "tracelearn"
# The name under which the copied agent loop is importable in verl's processes.
REPLAY_MODULE = "tracelearn_replay_loop"
# Hydra reads these characters in a value as syntax; values holding any other character are quoted.
_PLAIN_HYDRA_VALUE = re.compile(r"[A-Za-z0-9_./~+@%-]+")
# Rows dropped before the export is written, by reason (added to the export's own ``skipped``).
_WITHOUT_ADVANTAGE = "without_advantage"
_ZERO_ADVANTAGE = "zero_advantage"
_EMPTY_TOKENS = "empty_token_ids"
_TOO_LONG = "longer_than_max_sequence_tokens"
# Below this an advantage is a zero (a group whose rollouts all scored the same), as in training.grpo.
ZERO_ADVANTAGE = 1e-12


class VerlJobError(ValueError):
    """The transitions or the config cannot become a verl job: names the setting or row and what to do."""


@dataclass(frozen=True)
class VerlPaths:
    """The files of one job, all under ``directory`` (absolute, so the job runs from any directory)."""

    directory: Path

    @classmethod
    def under(cls, out: Path) -> VerlPaths:
        return cls(out.absolute() / "verl")

    @property
    def train_parquet(self) -> Path:
        return self.directory / f"{TRAIN}.parquet"

    @property
    def val_parquet(self) -> Path:
        return self.directory / f"{VALIDATION}.parquet"

    @property
    def agent_loop_config(self) -> Path:
        return self.directory / "agent_loop.yaml"

    @property
    def python_directory(self) -> Path:
        return self.directory / "python"

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def hydra_directory(self) -> Path:
        return self.directory / "hydra"

    @property
    def overrides_file(self) -> Path:
        return self.directory / "overrides.txt"

    @property
    def launch_script(self) -> Path:
        return self.directory / "launch.sh"


@dataclass(frozen=True)
class ReplayData:
    """What the overrides need to know about the exported rows."""

    train_rows: int
    val_rows: int
    max_prompt_tokens: int
    max_response_tokens: int
    train_rows_without_logprobs: int

    @property
    def all_train_rows_have_logprobs(self) -> bool:
        return self.train_rows_without_logprobs == 0


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


def uses_stored_logprobs(config: TrainConfig, data: ReplayData) -> bool:
    """Whether the stored logprobs serve as ``pi_old`` (``recompute_logprobs: missing`` and all rows have them).

    verl cannot recompute only the missing ones (it takes a whole batch's logprobs or none), so one
    training row without logprobs makes verl recompute every row's.
    """
    return config.grpo.recompute_logprobs == "missing" and data.all_train_rows_have_logprobs


def _unsupported_settings(config: TrainConfig) -> list[str]:
    problems = []
    if config.grpo.warmup_steps:
        problems.append(
            f"grpo.warmup_steps={config.grpo.warmup_steps}: verl steps its learning-rate scheduler once per PPO "
            "step, not per optimizer step; set it to 0"
        )
    if config.lora is not None and config.lora.dropout:
        problems.append(
            f"lora.dropout={config.lora.dropout}: verl builds its LoRA adapter without dropout; set it to 0"
        )
    if config.runtime.precision == "fp32":
        problems.append("runtime.precision=fp32: verl trains in bf16 with fp32 master weights; use auto or bf16")
    device = config.runtime.device
    if device != "auto" and not device.startswith("cuda"):
        problems.append(f"runtime.device={device}: verl runs on CUDA GPUs; use auto")
    return problems


def _hydra_text(value: str, what: str) -> str:
    """``value`` as a Hydra override value: as is when plain, else single-quoted."""
    if _PLAIN_HYDRA_VALUE.fullmatch(value):
        return value
    if "'" in value or "\\" in value or "${" in value:
        raise VerlJobError(f"{what} {value!r} holds a quote, a backslash or '${{': Hydra would misread it; rename it")
    return f"'{value}'"


def _hydra_names(names: tuple[str, ...], what: str) -> str:
    return "[" + ",".join(_hydra_text(name, what) for name in names) + "]"


def _flag(value: bool) -> str:
    return "True" if value else "False"


def _number(value: float) -> str:
    return repr(float(value))


def _train_batch_size(config: TrainConfig, data: ReplayData, world_size: int, batch_rows: int | None) -> int:
    """``data.train_batch_size``: whole mini-batches, all training rows unless ``batch_rows`` says fewer."""
    mini_batch = config.grpo.mini_batch_size
    if mini_batch % world_size:
        raise VerlJobError(
            f"grpo.mini_batch_size={mini_batch} must be a multiple of the {world_size} GPUs "
            "(verl splits each mini-batch evenly over them)"
        )
    if data.train_rows < mini_batch:
        raise VerlJobError(
            f"the training split has {data.train_rows} replayable transitions, fewer than "
            f"grpo.mini_batch_size={mini_batch}: lower grpo.mini_batch_size or build more transitions"
        )
    if batch_rows is None:
        # verl's dataloader drops the last incomplete batch: the rows past the last whole mini-batch.
        return data.train_rows // mini_batch * mini_batch
    if batch_rows % mini_batch or not mini_batch <= batch_rows <= data.train_rows:
        raise VerlJobError(
            f"batch_rows={batch_rows} must be a multiple of grpo.mini_batch_size={mini_batch} "
            f"between {mini_batch} and the {data.train_rows} training rows"
        )
    return batch_rows


def verl_overrides(
    config: TrainConfig,
    model_path: str,
    paths: VerlPaths,
    data: ReplayData,
    *,
    experiment_name: str,
    project_name: str = DEFAULT_PROJECT,
    n_gpus_per_node: int = 1,
    nnodes: int = 1,
    batch_rows: int | None = None,
) -> list[str]:
    """The Hydra overrides of ``verl.trainer.main_ppo`` that replay ``data`` with ``config``'s settings.

    ``batch_rows`` is ``data.train_batch_size``, the rows of one PPO step (default: every training
    row, in whole mini-batches; fewer bounds the memory of the Ray driver, which holds one step's
    batch, at the price of recomputing ``pi_old`` per step). Raises :class:`VerlJobError` for a
    setting verl cannot express or a batch that does not fit the data and the GPUs.
    """
    check_ranges(config)
    problems = _unsupported_settings(config)
    if problems:
        raise VerlJobError("train.yaml has settings the verl backend cannot honor: " + "; ".join(problems))
    if n_gpus_per_node < 1 or nnodes < 1:
        raise VerlJobError(f"n_gpus_per_node={n_gpus_per_node} and nnodes={nnodes} must both be at least 1")
    grpo, runtime = config.grpo, config.runtime
    batch = _train_batch_size(config, data, n_gpus_per_node * nnodes, batch_rows)
    response_length = data.max_response_tokens
    longest_sequence = data.max_prompt_tokens + response_length
    # The validation dataset must load although validation is off (it would only replay stored scores).
    val_files = paths.val_parquet if data.val_rows else paths.train_parquet
    actor = "actor_rollout_ref.actor"
    rollout = "actor_rollout_ref.rollout"
    model = "actor_rollout_ref.model"
    overrides = [
        "algorithm.adv_estimator=grpo",
        # Each row is replayed once (n=1): a group of one has mean 0, so without std division verl's
        # GRPO advantage is exactly the stored advantage the replay loop returns as the score.
        "algorithm.norm_adv_by_std_in_grpo=False",
        # No importance weights or rejection on top of the PPO ratio (verl's default, written down).
        "algorithm.rollout_correction.rollout_is=null",
        "algorithm.rollout_correction.rollout_rs=null",
    ]
    if uses_stored_logprobs(config, data):
        overrides.append("algorithm.rollout_correction.bypass_mode=True")  # pi_old := the stored logprobs
    overrides += [
        f"data.train_files={_hydra_text(str(paths.train_parquet), 'the training file')}",
        f"data.val_files={_hydra_text(str(val_files), 'the validation file')}",
        "data.return_raw_chat=True",
        f"data.train_batch_size={batch}",
        # verl pads every prompt and response to these lengths and cannot truncate stored tokens.
        f"data.max_prompt_length={data.max_prompt_tokens}",
        f"data.max_response_length={response_length}",
        f"data.seed={runtime.seed}",
        f"{model}.path={_hydra_text(model_path, 'the model path')}",
        f"{model}.enable_gradient_checkpointing={_flag(runtime.gradient_checkpointing)}",
    ]
    if config.lora is not None:
        overrides += [
            f"{model}.lora_rank={config.lora.r}",
            f"{model}.lora_alpha={config.lora.alpha}",
            f"{model}.target_modules={_hydra_names(config.lora.target_modules, 'the LoRA target module')}",
        ]
    overrides += [
        f"{actor}.optim.lr={_number(grpo.learning_rate)}",
        f"{actor}.optim.weight_decay={_number(grpo.weight_decay)}",  # verl's default is 0.01
        # The legacy FSDP worker reads actor.grad_clip, the newer engine optim.clip_grad.
        f"{actor}.optim.clip_grad={_number(grpo.max_grad_norm)}",
        f"{actor}.grad_clip={_number(grpo.max_grad_norm)}",
        f"{actor}.ppo_epochs={grpo.epochs}",
        f"{actor}.ppo_mini_batch_size={grpo.mini_batch_size}",
        # Micro-batches by token budget, as runtime.micro_batch_tokens; one sequence must fit.
        f"{actor}.use_dynamic_bsz=True",
        f"{actor}.ppo_max_token_len_per_gpu={max(runtime.micro_batch_tokens, longest_sequence)}",
        f"{actor}.clip_ratio_low={_number(grpo.clip_low)}",
        f"{actor}.clip_ratio_high={_number(grpo.clip_high)}",
    ]
    if grpo.loss_aggregation == "token_mean":
        overrides.append(f"{actor}.loss_agg_mode=token-mean")
    elif grpo.loss_aggregation == "seq_mean":
        overrides.append(f"{actor}.loss_agg_mode=seq-mean-token-mean")
    else:  # dr_grpo: each sequence's token sum over one constant, averaged over the mini-batch
        normalizer = grpo.dr_grpo_normalizer or data.max_response_tokens
        overrides += [f"{actor}.loss_agg_mode=seq-mean-token-sum-norm", f"{actor}.loss_scale_factor={normalizer}"]
    if grpo.kl_beta > 0:
        overrides += [
            f"{actor}.use_kl_loss=True",
            f"{actor}.kl_loss_coef={_number(grpo.kl_beta)}",
            f"{actor}.kl_loss_type=low_var_kl",  # verl's name for k3 (clamped to [-10, 10])
        ]
    else:
        overrides.append(f"{actor}.use_kl_loss=False")  # no reference model is loaded
    if config.lora is None:
        # A Hugging Face model next to verl's FSDP shards (a LoRA adapter comes from verl's model merger).
        overrides.append(f"{actor}.checkpoint.save_contents=[model,optimizer,extra,hf_model]")
    overrides += [
        # verl starts its rollout servers although the replay loop never calls them.
        f"{rollout}.name=vllm",
        f"{rollout}.tensor_model_parallel_size=1",
        f"{rollout}.n=1",
        f"{rollout}.temperature=1.0",  # training logprobs at temperature 1, as the stored ones
        # The replay loop returns logprobs exactly when every row has them (verl stacks all or none).
        f"{rollout}.calculate_log_probs={_flag(data.all_train_rows_have_logprobs)}",
    ]
    if config.lora is not None:
        overrides.append(f"{rollout}.load_format=safetensors")  # required with LoRA (ppo_lora.rst)
    total_steps = data.train_rows // batch
    overrides += [
        f"{rollout}.agent.agent_loop_config_path={_hydra_text(str(paths.agent_loop_config), 'the agent loop file')}",
        f"{rollout}.agent.default_agent_loop={verl_replay_loop.AGENT_LOOP_NAME}",
        # verl >= 0.9's V1 trainer (TransferQueue), synchronous: what the replay loop is written for.
        "trainer.use_v1=True",
        "trainer.v1.trainer_mode=sync",
        "trainer.total_epochs=1",
        # Save once, after the last step; never resume from an earlier run's checkpoints in this directory.
        f"trainer.save_freq={total_steps}",
        "trainer.resume_mode=disable",
        "trainer.test_freq=-1",
        "trainer.val_before_train=False",
        f"trainer.n_gpus_per_node={n_gpus_per_node}",
        f"trainer.nnodes={nnodes}",
        "trainer.logger=[console]",
        f"trainer.project_name={_hydra_text(project_name, 'the project name')}",
        f"trainer.experiment_name={_hydra_text(experiment_name, 'the experiment name')}",
        f"trainer.default_local_dir={_hydra_text(str(paths.checkpoints), 'the checkpoint directory')}",
        f"hydra.run.dir={_hydra_text(str(paths.hydra_directory), 'the Hydra directory')}",
    ]
    return overrides


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


def _replay_data(splits: Mapping[str, pl.DataFrame]) -> ReplayData:
    both = pl.concat([splits[TRAIN], splits[VALIDATION]])
    train = splits[TRAIN]
    return ReplayData(
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
