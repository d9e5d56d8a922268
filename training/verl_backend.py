"""The verl backend: the transitions replayed by verl's PPO trainer, as a job in verl's own environment.

Owns the job directory ``OUT/verl/`` and what runs there:

- ``train.parquet`` / ``val.parquet``: verl-replay rows (``tracelearn.pipelines.export_verl``), the
  RL columns verl's ``RLHFDataset`` reads plus the stored ``prompt_ids``, ``response_ids``,
  ``response_mask``, ``response_logprobs`` and ``advantage`` of every replayable transition;
- ``python/tracelearn_replay_loop.py`` (a copy of ``tracelearn.training.verl_replay_loop``) and
  ``agent_loop.yaml`` naming it: the agent loop that returns those stored tokens instead of sampling;
- ``overrides.txt`` and an executable ``launch.sh``: the Hydra overrides of
  ``python -m verl.trainer.main_ppo``, mapped from ``train.yaml`` (:func:`verl_overrides`);
- ``checkpoints/`` (verl writes ``global_step_N/actor/``: ``huggingface/`` for full fine-tuning,
  ``lora_adapter/`` with LoRA) and ``hydra/`` (verl's own logs).

verl pins its own torch and vLLM, so it never shares tracelearn's environment: :func:`prepare_verl_job`
needs no verl (and no GPU), :func:`find_verl_python` finds the Python of verl's environment and
:func:`run_verl_job` runs the job there as a child process. verl's Ray workers import the replay
loop through the ``PYTHONPATH`` the job sets, which a single-node run passes on to them; with
``nnodes > 1`` the job directory must be on storage every node sees, and each node's ``ray start``
needs the same ``PYTHONPATH``.

The training is the torch trainer's (``tracelearn.training.grpo``): the advantages are the ones
stored in the transitions (verl's GRPO estimator passes them through, see ``verl_replay_loop``),
``rollout.n`` is 1 (each transition is replayed once), one PPO step covers every training row by
default and ``ppo_epochs`` is ``grpo.epochs``, so ``pi_old`` is fixed for the whole run and every
epoch steps through the mini-batches of ``grpo.mini_batch_size`` rows. Where verl differs, the
difference is stated: its mini-batches keep one order across epochs (the torch trainer reshuffles
each epoch); the rows past the last whole mini-batch are not trained (verl's dataloader drops
them); transitions without the server's token ids cannot be replayed (the torch trainer
retokenizes them); and one training row without logprobs makes verl recompute ``pi_old`` for all
(see :func:`uses_stored_logprobs`). Settings verl cannot express are refused
(:class:`VerlJobError`), not dropped: ``grpo.warmup_steps`` (verl steps its scheduler once per PPO
step), ``lora.dropout`` (verl builds its adapter without dropout), ``runtime.precision: fp32`` (verl
trains in bf16 with fp32 master weights, our ``auto``/``bf16``), a non-CUDA ``runtime.device``.

Checked against volcengine/verl b178a3cd (0.8.0.dev, January 2026): the key names and defaults in
``verl/trainer/config/_generated_ppo_trainer.yaml`` (``actor/actor.yaml``, ``rollout/rollout.yaml``,
``model/hf_model.yaml``, ``optim/fsdp.yaml``), ``verl/utils/config.py`` (``validate_config``),
``verl/workers/config/actor.py``, ``verl/workers/fsdp_workers.py`` (mini-batch normalization, LoRA,
checkpoint layout), ``verl/workers/actor/dp_actor.py``, ``verl/trainer/ppo/ray_trainer.py``
(dataloader ``drop_last``, validation, bypass mode, checkpoints), ``verl/trainer/ppo/core_algos.py``
(``agg_loss``, GRPO advantage, ``low_var_kl``), ``verl/trainer/main_ppo.py`` and
``docs/advance/ppo_lora.rst``. REFERENCE.md names verl 0.9.1: re-check the keys when pinning it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import polars as pl
import yaml

from tracelearn.pipelines.export_verl import (
    TRAIN,
    VALIDATION,
    VerlExport,
    load_transitions,
    to_verl_replay,
    write_verl_export,
)
from tracelearn.processes import ChildProcess, ChildProcessError, ChildTimeoutError, start_child
from tracelearn.training import verl_replay_loop
from tracelearn.training.config import TrainConfig, check_ranges, train_config_hash

__all__ = [
    "ENV_VARS",
    "VERL_PYTHON_ENV",
    "ReplayData",
    "VerlJob",
    "VerlJobError",
    "VerlNotAvailableError",
    "VerlPaths",
    "find_verl_python",
    "latest_verl_checkpoint",
    "prepare_verl_job",
    "run_verl_job",
    "uses_stored_logprobs",
    "verl_command",
    "verl_overrides",
]

VERL_PYTHON_ENV = "TRACELEARN_VERL_PYTHON"
# The training settings, as the README's settings table lists them (a test keeps the two equal).
ENV_VARS: dict[str, tuple[str, str]] = {
    VERL_PYTHON_ENV: ("unset", "Python of verl's own environment (`train grpo --backend verl`, the DAG's verl step)."),
}
VERL_ENTRY_POINT = "verl.trainer.main_ppo"
DEFAULT_PROJECT = "tracelearn"
# The name under which the copied agent loop is importable in verl's processes.
REPLAY_MODULE = "tracelearn_replay_loop"
# Importing verl pulls in torch; on a cold file cache that takes a while.
CHECK_TIMEOUT_S = 300.0
# After a forwarded signal, how long the job has to shut Ray down before its process group is killed.
SHUTDOWN_GRACE_S = 60.0

_HOW_TO_INSTALL = (
    "verl pins its own torch and vLLM, so it lives in an environment of its own: on a CUDA machine run "
    "`python3.12 -m venv ~/verl-env && ~/verl-env/bin/pip install 'verl[vllm]'`, then pass "
    f"--verl-python ~/verl-env/bin/python or set {VERL_PYTHON_ENV}. Everything else in tracelearn "
    "(capture, pipelines, export, the torch GRPO/SFT trainers) runs without it."
)
# Run by the candidate Python: verl imports, and it has the experimental agent-loop API the replay needs.
_VERL_CHECK = (
    "import importlib.util, sys\n"
    "import verl\n"
    "if importlib.util.find_spec('verl.experimental.agent_loop') is None:\n"
    "    sys.exit('verl ' + verl.__version__ + ' has no verl.experimental.agent_loop (the replay loop needs it)')\n"
    "print(verl.__version__)\n"
)
# Hydra reads these characters in a value as syntax; values holding any other character are quoted.
_PLAIN_HYDRA_VALUE = re.compile(r"[A-Za-z0-9_./~+@%-]+")
# Rows dropped before the export is written, by reason (added to the export's own ``skipped``).
_WITHOUT_ADVANTAGE = "without_advantage"
_ZERO_ADVANTAGE = "zero_advantage"
_EMPTY_TOKENS = "empty_token_ids"
_TOO_LONG = "longer_than_max_sequence_tokens"
# Below this an advantage is a zero (a group whose rollouts all scored the same), as in training.grpo.
ZERO_ADVANTAGE = 1e-12


class VerlNotAvailableError(RuntimeError):
    """No usable verl environment: says which Python was tried and how to create one."""


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
    stored logprobs are ``pi_old`` (verl's bypass mode); else verl recomputes them.
    """

    paths: VerlPaths
    model_path: str
    overrides: tuple[str, ...]
    environment: Mapping[str, str]
    data: ReplayData
    skipped: Mapping[str, int] = field(default_factory=dict)
    stored_logprobs_as_old: bool = False


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
    if grpo.loss_aggregation == "dr_grpo" and grpo.dr_grpo_normalizer is not None:
        if grpo.dr_grpo_normalizer < data.max_response_tokens:
            raise VerlJobError(
                f"grpo.dr_grpo_normalizer={grpo.dr_grpo_normalizer} is below the longest stored response "
                f"({data.max_response_tokens} tokens): verl's FSDP worker divides by the padded response length, "
                "at least the longest response; raise it or leave it empty (the longest response)"
            )
        # Padding every response to the normalizer makes both of verl's workers divide by it.
        response_length = grpo.dr_grpo_normalizer
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
    else:  # dr_grpo: token sums over a constant, no std division (set above)
        overrides += [f"{actor}.loss_agg_mode=seq-mean-token-sum-norm", f"{actor}.loss_scale_factor={response_length}"]
    if grpo.kl_beta > 0:
        overrides += [
            f"{actor}.use_kl_loss=True",
            f"{actor}.kl_loss_coef={_number(grpo.kl_beta)}",
            f"{actor}.kl_loss_type=low_var_kl",  # verl's name for k3 (clamped to [-10, 10])
        ]
    else:
        overrides.append(f"{actor}.use_kl_loss=False")  # no reference model is loaded
    if config.lora is None:
        # A Hugging Face model next to verl's FSDP shards (LoRA runs save lora_adapter/ anyway).
        overrides.append(f"{actor}.checkpoint.save_contents=[model,optimizer,extra,hf_model]")
    overrides += [
        # verl starts its rollout servers although the replay loop never calls them.
        f"{rollout}.name=vllm",
        f"{rollout}.tensor_model_parallel_size=1",
        f"{rollout}.n=1",
        f"{rollout}.temperature=1.0",  # training logprobs at temperature 1, as the stored ones
    ]
    if config.lora is not None:
        overrides.append(f"{rollout}.load_format=safetensors")  # required with LoRA (ppo_lora.rst)
    total_steps = data.train_rows // batch
    overrides += [
        f"{rollout}.agent.agent_loop_config_path={_hydra_text(str(paths.agent_loop_config), 'the agent loop file')}",
        f"{rollout}.agent.default_agent_loop={verl_replay_loop.AGENT_LOOP_NAME}",
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
        (_WITHOUT_ADVANTAGE, pl.col("advantage").is_null() | pl.col("advantage").is_nan()),
        (_EMPTY_TOKENS, (pl.col("prompt_ids").list.len() == 0) | (pl.col("response_ids").list.len() == 0)),
    ]
    # As the torch trainer: a zero advantage carries no gradient unless a KL term pulls on the sequence.
    if config.grpo.skip_zero_advantage and config.grpo.kl_beta == 0:
        reasons.append((_ZERO_ADVANTAGE, pl.col("advantage").abs() <= ZERO_ADVANTAGE))
    if config.runtime.max_sequence_tokens is not None:
        length = pl.col("prompt_ids").list.len() + pl.col("response_ids").list.len()
        reasons.append((_TOO_LONG, length > config.runtime.max_sequence_tokens))
    splits = dict(export.splits)
    for reason, condition in reasons:
        drop = condition.fill_null(False)
        skipped[reason] = sum(rows.filter(drop).height for rows in splits.values())
        splits = {name: rows.filter(~drop) for name, rows in splits.items()}
    return splits, skipped


def _check_lengths(rows: pl.DataFrame) -> None:
    """Refuse (naming the span) a row whose mask or logprobs do not match its response tokens."""
    response = pl.col("response_ids").list.len()
    logprobs = pl.col("response_logprobs")
    bad = rows.filter(
        (pl.col("response_mask").list.len() != response) | (logprobs.is_not_null() & (logprobs.list.len() != response))
    )
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
        max_prompt_tokens=int(both["prompt_ids"].list.len().max() or 0),  # type: ignore[arg-type]
        max_response_tokens=int(both["response_ids"].list.len().max() or 0),  # type: ignore[arg-type]
        train_rows_without_logprobs=train["response_logprobs"].null_count(),
    )


def _launch_script(paths: VerlPaths, overrides: list[str], environment: Mapping[str, str]) -> str:
    lines = [
        "#!/usr/bin/env bash",
        "# Written by tracelearn.training.verl_backend: replays the transitions in train.parquet with verl.",
        f"# Runs in verl's own environment: set {VERL_PYTHON_ENV} to its python (verl needs CUDA GPUs).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(paths.directory))}",
    ]
    lines += [f"export {name}={shlex.quote(value)}${{{name}:+:${{{name}}}}}" for name, value in environment.items()]
    python = f'"${{{VERL_PYTHON_ENV}:?set {VERL_PYTHON_ENV} to the python of the verl environment}}"'
    command = [f"exec {python} -m {VERL_ENTRY_POINT}"] + [f"  {shlex.quote(item)}" for item in overrides]
    return "\n".join([*lines, " \\\n".join(command)]) + "\n"


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
    paths.launch_script.write_text(_launch_script(paths, overrides, environment), encoding="utf-8")
    paths.launch_script.chmod(0o755)
    return VerlJob(
        paths=paths,
        model_path=model_path,
        overrides=tuple(overrides),
        environment=environment,
        data=data,
        skipped=skipped,
        stored_logprobs_as_old=uses_stored_logprobs(config, data),
    )


def latest_verl_checkpoint(job_directory: Path, lora: bool) -> Path:
    """The weights of a finished job's last step: ``checkpoints/global_step_N/actor/huggingface`` (full
    fine-tuning) or ``.../lora_adapter`` (LoRA), for the highest N. ``VerlJobError`` when there is none."""
    checkpoints = VerlPaths(job_directory).checkpoints
    steps = sorted((int(p.name.removeprefix("global_step_")), p) for p in checkpoints.glob("global_step_*")
                   if p.name.removeprefix("global_step_").isdigit())
    if not steps:
        raise VerlJobError(f"{checkpoints}: the verl job saved no checkpoint (no global_step_N directory)")
    weights = steps[-1][1] / "actor" / ("lora_adapter" if lora else "huggingface")
    if not weights.is_dir():
        raise VerlJobError(f"{weights} is missing: the job's last checkpoint holds no {weights.name} weights")
    return weights


def find_verl_python(explicit: str | None) -> str:
    """The Python of verl's environment: ``explicit`` (``--verl-python``), else ``$TRACELEARN_VERL_PYTHON``.

    Checked by running it: verl must import and have ``verl.experimental.agent_loop``. Raises
    :class:`VerlNotAvailableError` saying what was tried and how to create the environment.
    """
    source = "--verl-python" if explicit else f"${VERL_PYTHON_ENV}"
    candidate = explicit or os.environ.get(VERL_PYTHON_ENV)
    if not candidate:
        raise VerlNotAvailableError(
            f"no Python for verl: pass --verl-python or set {VERL_PYTHON_ENV}. {_HOW_TO_INSTALL}"
        )
    found = shutil.which(candidate)
    if found is None:
        raise VerlNotAvailableError(f"{candidate} (from {source}) is not an executable Python. {_HOW_TO_INSTALL}")
    # Absolute but not resolved: a venv's python is a symlink, and resolving it would leave the venv.
    python = str(Path(found).absolute())
    try:
        check = subprocess.run(
            [python, "-c", _VERL_CHECK], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise VerlNotAvailableError(
            f"{python} (from {source}) did not import verl within {CHECK_TIMEOUT_S:.0f} s. {_HOW_TO_INSTALL}"
        ) from error
    except OSError as error:
        raise VerlNotAvailableError(f"{python} (from {source}) cannot be run: {error}. {_HOW_TO_INSTALL}") from error
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or [f"exit status {check.returncode}"])[-1]
        raise VerlNotAvailableError(f"{python} (from {source}) has no usable verl: {reason}. {_HOW_TO_INSTALL}")
    return python


def verl_command(job: VerlJob, python: str) -> list[str]:
    """The command line of ``job`` run by ``python`` (the Python of verl's environment)."""
    return [python, "-m", VERL_ENTRY_POINT, *job.overrides]


def _job_environment(job: VerlJob) -> dict[str, str]:
    environment = dict(os.environ)
    for name, value in job.environment.items():
        environment[name] = value + (os.pathsep + environment[name] if environment.get(name) else "")
    return environment


@contextlib.contextmanager
def _forwarding_sigterm(child: ChildProcess) -> Iterator[None]:
    """While inside, a SIGTERM to this process is passed on to the job (which then shuts down)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _echo(line: str) -> None:
    print(line, flush=True)


def run_verl_job(job: VerlJob, python: str, log_path: Path) -> int:
    """Run ``job`` with ``python``, its output streamed to the console and to ``log_path``; its exit status.

    The job runs in its directory in a process group of its own (verl's Ray processes with its
    driver). A SIGTERM to this process, or a KeyboardInterrupt (forwarded as SIGINT), reaches the whole
    group and the job gets ``SHUTDOWN_GRACE_S`` to stop; a second KeyboardInterrupt kills it. Returns
    the exit status the shell would report (128 + the signal number for a job ended by a signal).
    """
    try:
        child = start_child(verl_command(job, python), name="the verl job", log=log_path, env=_job_environment(job),
                            cwd=job.paths.directory, on_line=_echo)
    except ChildProcessError as error:
        raise VerlNotAvailableError(f"{error}. {_HOW_TO_INSTALL}") from error
    interrupts = 0
    with _forwarding_sigterm(child):
        while True:
            try:
                status = child.wait(SHUTDOWN_GRACE_S if interrupts else None)
                break
            except KeyboardInterrupt:
                interrupts += 1
                child.send_signal(signal.SIGINT if interrupts == 1 else signal.SIGKILL)
            except ChildTimeoutError:
                status = child.stop(grace_s=0)
                break
    return status if status >= 0 else 128 - status
