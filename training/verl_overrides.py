"""The Hydra overrides of ``python -m verl.trainer.main_ppo`` that replay stored transitions with the
settings of ``train.yaml``: what a verl replay job says to verl (``tracelearn.training.verl_backend``
writes the job around them).

Each setting maps to verl 0.9.1's keys (``verl/trainer/config/_generated_ppo_trainer.yaml``; the
contract tests compose verl's own config with every override written here). Settings verl cannot
express are refused (:class:`VerlJobError`), not dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tracelearn.pipelines.export_verl import TRAIN, VALIDATION
from tracelearn.training import verl_replay_loop
from tracelearn.training.config import TrainConfig, check_ranges

__all__ = ["DEFAULT_PROJECT", "VERL_LORA_RANK_LIMIT", "ReplayData", "VerlJobError", "VerlPaths", "uses_stored_logprobs",
           "verl_overrides"]

DEFAULT_PROJECT = "tracelearn"
# verl checks a LoRA rank against vLLM's allowed ranks for its rollout (validate_config): 512 at most.
VERL_LORA_RANK_LIMIT = 512
# Hydra reads these characters in a value as syntax; values holding any other character are quoted.
_PLAIN_HYDRA_VALUE = re.compile(r"[A-Za-z0-9_./~+@%-]+")


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
    # The one temperature the training rows were sampled at (unknown counts as 1): verl divides the logits
    # by it when it computes logprobs, as the server did before sampling.
    temperature: float = 1.0

    @property
    def all_train_rows_have_logprobs(self) -> bool:
        return self.train_rows_without_logprobs == 0


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
    if config.lora is not None and config.lora.r > VERL_LORA_RANK_LIMIT:
        problems.append(
            f"lora.r={config.lora.r}: verl's rollout serves LoRA with vLLM, whose largest rank is "
            f"{VERL_LORA_RANK_LIMIT}; lower it"
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
        f"{rollout}.temperature={_number(data.temperature)}",  # training logprobs at the data's temperature
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
