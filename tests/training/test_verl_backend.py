"""The verl backend on CPU, without verl: the job's files, its overrides, the launch and the replay loop.

The same files against the real verl release: tests/contracts/test_verl_contract.py.
"""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.export_verl import (
    CHAT_MESSAGE,
    EXTRA_INFO,
    REPLAY_COLUMN,
    REPLAY_SCHEMA,
    REPLAY_TOKENS,
    load_transitions,
)
from tracelearn.schemas import semconv as sc
from tracelearn.training import verl_replay_loop
from tracelearn.training.config import GrpoConfig, LoraConfig, RuntimeConfig, TrainConfig
from tracelearn.training.verl_backend import (
    ReplayData,
    VerlCheckpointError,
    VerlJob,
    VerlJobError,
    VerlPaths,
    latest_verl_checkpoint,
    prepare_verl_job,
    verl_overrides,
)
from tracelearn.training.verl_environment import (
    VERL_PIN,
    VerlNotAvailableError,
    find_verl_python,
    version_in_range,
)
from tracelearn.training.verl_replay_loop import ReplayRowError, replay_output_fields
from tracelearn.training.verl_runtime import run_verl_job, verl_command

NOW = at(3600)
# task -> rewards of its four rollouts; t3's are all equal, so its advantages are 0 (no signal).
REWARDS = {"t0": [1.0, 0.0, 1.0, 0.0], "t1": [0.0, 1.0, 1.0, 1.0], "t2": [1.0, 0.0, 0.0, 0.0], "t3": [0.5] * 4}
MODEL = "/models/smollm2-135m"
CONFIG = TrainConfig(grpo=GrpoConfig(mini_batch_size=4))


def stored_tokens(task: int, rollout: int) -> tuple[list[int], list[int], list[float]]:
    """Server token ids and logprobs of a solve call: prompts grow with the task, responses with the rollout."""
    prompt = [100 + task, *range(1, 2 + task)]
    response = [200 + 10 * task + step for step in range(rollout + 1)]
    return prompt, response, [-0.125 * (step + 1) for step in range(rollout + 1)]


def write_spans(data: Path, with_token_ids: bool = True, temperature: Any = None) -> None:
    """Each rollout: a ``solve`` call with the server's token ids, a ``note`` call without, a reward.

    ``temperature(task_index, rollout)``: the temperature the solve call was sampled at (None: not recorded)."""
    factory = SpansFactory(data / "spans")
    trace = 0
    for task_index, (task, rewards) in enumerate(REWARDS.items()):
        for rollout, value in enumerate(rewards):
            trace += 1
            root = factory.root(trace, 0, 100, task_id=task)
            factory.llm(trace, root, 1, user=f"{task}: solve", task_id=task, agent="solver")
            if with_token_ids:
                attributes = factory.records[-1].attributes
                assert isinstance(attributes, dict)
                prompt, response, logprobs = stored_tokens(task_index, rollout)
                attributes[sc.PROMPT_TOKEN_IDS], attributes[sc.RESPONSE_TOKEN_IDS] = prompt, response
                attributes[sc.RESPONSE_LOGPROBS] = logprobs
                attributes[sc.TOKEN_IDS_STATUS] = sc.TOKEN_IDS_FROM_SERVER
                if temperature is not None and temperature(task_index, rollout) is not None:
                    attributes[sc.GEN_AI_REQUEST_TEMPERATURE] = temperature(task_index, rollout)
            factory.llm(trace, root, 3, user=f"{task}: note", task_id=task, agent="noter")
            factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("built")
    write_spans(root / "data")
    build_transitions(root / "data", root / "out", now=NOW)
    return root / "out"


@pytest.fixture
def job(built: Path, tmp_path: Path) -> VerlJob:
    return prepare_verl_job(built, tmp_path / "run", MODEL, CONFIG)


def standin_python(directory: Path, exit_code: int) -> Path:
    """An executable standing in for verl's Python: records argv, cwd and PYTHONPATH, prints, exits ``exit_code``."""
    script = directory / "standin-python"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""\
            import json, os, sys
            record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH", "")}}
            with open({str(directory / "record.json")!r}, "w") as out:
                json.dump(record, out)
            print("verl says hello")
            print("step 1/1 done", file=sys.stderr)
            sys.exit({exit_code})
            """
        )
    )
    script.chmod(0o755)
    return script


def recorded(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "record.json").read_text())
    return result


# The job's data ----------------------------------------------------------------------------------


def test_job_parquet_holds_what_rlhf_dataset_and_the_replay_loop_read(job: VerlJob, built: Path) -> None:
    train = pq.read_table(job.paths.train_parquet)
    assert train.schema.remove_metadata() == REPLAY_SCHEMA
    # RLHFDataset: the chat prompt it applies the template to, and extra_info.index
    assert train.schema.field("prompt").type == pa.list_(CHAT_MESSAGE)
    assert train.schema.field("extra_info").type == EXTRA_INFO
    assert train.schema.field("extra_info").type.field("index").type == pa.int64()
    # the replay loop: the stored tokens as generated, in one column under a name verl never uses
    assert train.schema.names == ["data_source", "prompt", "ability", "reward_model", "extra_info", REPLAY_COLUMN]
    stored_type = train.schema.field(REPLAY_COLUMN).type
    assert stored_type == REPLAY_TOKENS
    assert stored_type.field("prompt_ids").type == stored_type.field("response_ids").type == pa.list_(pa.int32())
    assert stored_type.field("response_mask").type == pa.list_(pa.int8())
    assert stored_type.field("response_logprobs").type == pa.list_(pa.float32())
    assert stored_type.field("advantage").type == pa.float64()
    assert REPLAY_COLUMN == verl_replay_loop.REPLAY_COLUMN  # the copied loop cannot import the exporter
    assert pq.read_table(job.paths.val_parquet).num_rows == 0  # every transition trains by default

    # 16 solve calls with token ids; t3's four carry no signal (advantage 0) and the note calls no ids
    assert train.num_rows == 12
    assert dict(job.skipped) == {
        "bad_messages": 0,
        "without_token_ids": 16,
        "without_advantage": 0,
        "empty_token_ids": 0,
        "zero_advantage": 4,
    }
    stored = load_transitions(built).filter(pl.col("agent_name") == "solver").collect()
    advantages = dict(zip(stored["span_id"], stored["advantage"], strict=True))
    for row in train.to_pylist():
        info = row["extra_info"]
        assert info["task_id"] != "t3"
        stored_tokens = row[REPLAY_COLUMN]
        assert stored_tokens["advantage"] == advantages[info["span_id"]] != 0.0
        assert row["prompt"][-1] == {"role": "user", "content": f"{info['task_id']}: solve"}
        lengths = {len(stored_tokens[name]) for name in ("response_logprobs", "response_ids", "response_mask")}
        assert len(lengths) == 1
    assert job.data == ReplayData(
        train_rows=12, val_rows=0, max_prompt_tokens=4, max_response_tokens=4, train_rows_without_logprobs=0
    )
    assert job.stored_logprobs_as_old


def test_every_exported_row_replays_its_stored_tokens_unchanged(job: VerlJob, built: Path) -> None:
    stored = load_transitions(built).filter(pl.col("agent_name") == "solver").collect()
    by_span = {row["span_id"]: row for row in stored.iter_rows(named=True)}
    for row in pq.read_table(job.paths.train_parquet).to_pylist():
        transition = by_span[row["extra_info"]["span_id"]]
        fields = replay_output_fields(row, with_logprobs=True)
        assert fields["prompt_ids"] == transition["prompt_token_ids"]
        assert fields["response_ids"] == transition["response_token_ids"]
        assert fields["response_logprobs"] == pytest.approx(transition["response_logprobs"])
        assert fields["response_mask"] == [1] * len(transition["response_token_ids"])
        # the score verl turns into the advantage is the stored advantage, untouched
        assert fields["reward_score"] == transition["advantage"]
        assert replay_output_fields(row, with_logprobs=False)["response_logprobs"] is None


def test_held_out_tasks_go_to_the_validation_file(built: Path, tmp_path: Path) -> None:
    job = prepare_verl_job(built, tmp_path / "run", MODEL, CONFIG, val_fraction=0.5)
    train = pq.read_table(job.paths.train_parquet).to_pylist()
    val = pq.read_table(job.paths.val_parquet).to_pylist()
    assert val and job.data.val_rows == len(val) and job.data.train_rows == len(train)
    train_tasks = {row["extra_info"]["task_id"] for row in train}
    assert not train_tasks & {row["extra_info"]["task_id"] for row in val}
    assert f"data.val_files={job.paths.val_parquet}" in job.overrides


def test_zero_advantage_rows_train_when_a_kl_term_pulls_on_them(built: Path, tmp_path: Path) -> None:
    config = TrainConfig(grpo=GrpoConfig(mini_batch_size=4, kl_beta=0.1))
    job = prepare_verl_job(built, tmp_path / "run", MODEL, config)
    assert "zero_advantage" not in job.skipped and job.data.train_rows == 16
    advantages = [row["advantage"] for row in pq.read_table(job.paths.train_parquet)[REPLAY_COLUMN].to_pylist()]
    assert advantages.count(0.0) == 4  # t3's rollouts, kept for the KL term


def test_sequences_over_max_sequence_tokens_are_left_out_and_counted(built: Path, tmp_path: Path) -> None:
    config = TrainConfig(grpo=GrpoConfig(mini_batch_size=4), runtime=RuntimeConfig(max_sequence_tokens=6))
    job = prepare_verl_job(built, tmp_path / "run", MODEL, config)
    # prompt + response tokens (stored_tokens): t1's last rollout has 7, t2's last two 7 and 8
    assert job.skipped["longer_than_max_sequence_tokens"] == 3
    rows = pq.read_table(job.paths.train_parquet).to_pylist()
    assert len(rows) == job.data.train_rows == 9
    stored = [row[REPLAY_COLUMN] for row in rows]
    assert max(len(tokens["prompt_ids"]) + len(tokens["response_ids"]) for tokens in stored) == 6
    assert "data.train_batch_size=8" in job.overrides  # 9 rows: two whole mini-batches of 4


def test_transitions_without_token_ids_are_refused_with_what_to_do(tmp_path: Path) -> None:
    write_spans(tmp_path / "data", with_token_ids=False)
    build_transitions(tmp_path / "data", tmp_path / "out", now=NOW)
    with pytest.raises(VerlJobError, match="no transition can be replayed") as error:
        prepare_verl_job(tmp_path / "out", tmp_path / "run", MODEL, CONFIG)
    assert "'without_token_ids': 32" in str(error.value) and "return_token_ids" in str(error.value)
    assert not (tmp_path / "run" / "verl" / "launch.sh").exists()


# Overrides ---------------------------------------------------------------------------------------

PATHS = VerlPaths(Path("/jobs/run1/verl"))
DATA = ReplayData(train_rows=13, val_rows=0, max_prompt_tokens=6, max_response_tokens=40, train_rows_without_logprobs=0)
DEFAULT_OVERRIDES = [
    "algorithm.adv_estimator=grpo",
    "algorithm.norm_adv_by_std_in_grpo=False",
    "algorithm.rollout_correction.rollout_is=null",
    "algorithm.rollout_correction.rollout_rs=null",
    "algorithm.rollout_correction.bypass_mode=True",
    "data.train_files=/jobs/run1/verl/train.parquet",
    "data.val_files=/jobs/run1/verl/train.parquet",
    "data.return_raw_chat=True",
    "data.train_batch_size=12",
    "data.max_prompt_length=6",
    "data.max_response_length=40",
    "data.seed=0",
    f"actor_rollout_ref.model.path={MODEL}",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "actor_rollout_ref.actor.optim.lr=1e-05",
    "actor_rollout_ref.actor.optim.weight_decay=0.0",
    "actor_rollout_ref.actor.optim.clip_grad=1.0",
    "actor_rollout_ref.actor.grad_clip=1.0",
    "actor_rollout_ref.actor.ppo_epochs=1",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.2",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
    "actor_rollout_ref.actor.use_kl_loss=False",
    "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "actor_rollout_ref.rollout.n=1",
    "actor_rollout_ref.rollout.temperature=1.0",
    "actor_rollout_ref.rollout.calculate_log_probs=True",
    "actor_rollout_ref.rollout.agent.agent_loop_config_path=/jobs/run1/verl/agent_loop.yaml",
    "actor_rollout_ref.rollout.agent.default_agent_loop=tracelearn_replay",
    "trainer.use_v1=True",
    "trainer.v1.trainer_mode=sync",
    "trainer.total_epochs=1",
    "trainer.save_freq=1",
    "trainer.resume_mode=disable",
    "trainer.test_freq=-1",
    "trainer.val_before_train=False",
    "trainer.n_gpus_per_node=1",
    "trainer.nnodes=1",
    "trainer.logger=[console]",
    "trainer.project_name=tracelearn",
    "trainer.experiment_name=replay-test",
    "trainer.default_local_dir=/jobs/run1/verl/checkpoints",
    "hydra.run.dir=/jobs/run1/verl/hydra",
]


def overrides(config: TrainConfig, data: ReplayData = DATA, **options: Any) -> list[str]:
    return verl_overrides(config, MODEL, PATHS, data, experiment_name="replay-test", **options)


def changed(result: list[str]) -> tuple[list[str], list[str]]:
    """(overrides added to, removed from) the default ones, in order."""
    return [item for item in result if item not in DEFAULT_OVERRIDES], [
        item for item in DEFAULT_OVERRIDES if item not in result
    ]


def test_default_overrides_replay_the_stored_advantages_with_stored_logprobs_as_pi_old() -> None:
    # 13 rows in mini-batches of 4: one PPO step of 12 rows (verl drops the incomplete batch)
    assert overrides(CONFIG) == DEFAULT_OVERRIDES


def test_dr_grpo_with_kl_and_lora_overrides() -> None:
    config = TrainConfig(
        grpo=GrpoConfig(mini_batch_size=4, loss_aggregation="dr_grpo", kl_beta=0.05, epochs=2, learning_rate=3e-6),
        lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
    )
    added, removed = changed(overrides(config))
    assert added == [
        "actor_rollout_ref.model.lora_rank=8",
        "actor_rollout_ref.model.lora_alpha=16",
        "actor_rollout_ref.model.target_modules=[q_proj,v_proj]",
        "actor_rollout_ref.actor.optim.lr=3e-06",
        "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
        "actor_rollout_ref.actor.loss_scale_factor=40",  # Dr. GRPO's constant: the longest response
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_coef=0.05",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.rollout.load_format=safetensors",
    ]
    assert removed == [
        "actor_rollout_ref.actor.optim.lr=1e-05",
        "actor_rollout_ref.actor.ppo_epochs=1",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",  # LoRA: the adapter
    ]


@pytest.mark.parametrize("normalizer", [64, 16])
def test_dr_grpo_normalizer_is_verls_loss_scale_factor_whatever_the_longest_response(normalizer: int) -> None:
    # verl >= 0.8 divides each sequence's token sum by loss_scale_factor, not by the padded length,
    # so the responses keep their own length and a normalizer below the longest response is fine.
    config = TrainConfig(grpo=GrpoConfig(mini_batch_size=4, loss_aggregation="dr_grpo", dr_grpo_normalizer=normalizer))
    assert changed(overrides(config)) == (
        [
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
            f"actor_rollout_ref.actor.loss_scale_factor={normalizer}",
        ],
        ["actor_rollout_ref.actor.loss_agg_mode=token-mean"],
    )


def test_seq_mean_and_clip_higher_overrides() -> None:
    config = TrainConfig(grpo=GrpoConfig(mini_batch_size=4, loss_aggregation="seq_mean", clip_high=0.28))
    assert changed(overrides(config)) == (
        ["actor_rollout_ref.actor.clip_ratio_high=0.28", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"],
        ["actor_rollout_ref.actor.clip_ratio_high=0.2", "actor_rollout_ref.actor.loss_agg_mode=token-mean"],
    )


def test_verl_recomputes_pi_old_when_asked_or_when_a_row_lacks_logprobs() -> None:
    bypass = "algorithm.rollout_correction.bypass_mode=True"
    always = TrainConfig(grpo=GrpoConfig(mini_batch_size=4, recompute_logprobs="always"))
    assert changed(overrides(always)) == ([], [bypass])  # the stored logprobs still reach verl's metrics
    some_missing = ReplayData(13, 0, 6, 40, train_rows_without_logprobs=1)
    # verl >= 0.9 defaults calculate_log_probs to true and would then read logprobs the loop cannot return
    assert changed(overrides(CONFIG, some_missing)) == (
        ["actor_rollout_ref.rollout.calculate_log_probs=False"],
        [bypass, "actor_rollout_ref.rollout.calculate_log_probs=True"],
    )


def test_runtime_settings_batches_and_gpus_overrides() -> None:
    config = TrainConfig(
        grpo=GrpoConfig(mini_batch_size=4),
        runtime=RuntimeConfig(gradient_checkpointing=True, micro_batch_tokens=32, seed=7),
    )
    data = ReplayData(
        train_rows=40, val_rows=3, max_prompt_tokens=6, max_response_tokens=40, train_rows_without_logprobs=0
    )
    result = overrides(config, data, n_gpus_per_node=2, nnodes=2, batch_rows=8)
    assert changed(result) == (
        [
            "data.val_files=/jobs/run1/verl/val.parquet",
            "data.train_batch_size=8",
            "data.seed=7",
            "actor_rollout_ref.model.enable_gradient_checkpointing=True",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=46",  # one whole sequence must fit
            "trainer.save_freq=5",  # 40 rows in steps of 8: checkpoint after the last
            "trainer.n_gpus_per_node=2",
            "trainer.nnodes=2",
        ],
        [
            "data.val_files=/jobs/run1/verl/train.parquet",
            "data.train_batch_size=12",
            "data.seed=0",
            "actor_rollout_ref.model.enable_gradient_checkpointing=False",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
            "trainer.save_freq=1",
            "trainer.n_gpus_per_node=1",
            "trainer.nnodes=1",
        ],
    )


def test_batches_that_do_not_fit_the_data_or_the_gpus_are_refused() -> None:
    with pytest.raises(VerlJobError, match="mini_batch_size=4 must be a multiple of the 8 GPUs"):
        overrides(CONFIG, n_gpus_per_node=8)
    with pytest.raises(VerlJobError, match=r"13 replayable transitions, fewer than grpo\.mini_batch_size=16"):
        overrides(TrainConfig(grpo=GrpoConfig(mini_batch_size=16)))
    with pytest.raises(VerlJobError, match=r"batch_rows=6 must be a multiple of grpo\.mini_batch_size=4"):
        overrides(CONFIG, batch_rows=6)


def test_settings_verl_cannot_honor_are_refused_together() -> None:
    config = TrainConfig(
        grpo=GrpoConfig(mini_batch_size=4, warmup_steps=10),
        lora=LoraConfig(dropout=0.05),
        runtime=RuntimeConfig(precision="fp32", device="cpu"),
    )
    with pytest.raises(VerlJobError) as error:
        overrides(config)
    message = str(error.value)
    for setting in ("grpo.warmup_steps=10", "lora.dropout=0.05", "runtime.precision=fp32", "runtime.device=cpu"):
        assert setting in message
    too_wide = r"lora\.r=1024: verl's rollout serves LoRA with vLLM, whose largest rank is 512"
    with pytest.raises(VerlJobError, match=too_wide):
        overrides(TrainConfig(grpo=GrpoConfig(mini_batch_size=4), lora=LoraConfig(r=1024, alpha=16)))


def test_paths_hydra_would_misread_are_quoted_or_refused() -> None:
    odd = VerlPaths(Path("/jobs/run 1,a=b/verl"))
    result = verl_overrides(CONFIG, "org/model", odd, DATA, experiment_name="replay-test")
    assert "data.train_files='/jobs/run 1,a=b/verl/train.parquet'" in result
    assert "actor_rollout_ref.model.path=org/model" in result  # a Hugging Face id needs no quotes
    with pytest.raises(VerlJobError, match="the model path"):
        verl_overrides(CONFIG, "/models/it's", PATHS, DATA, experiment_name="replay-test")


# The launch --------------------------------------------------------------------------------------


def test_job_files_hold_the_overrides_and_the_loop_config(job: VerlJob) -> None:
    assert job.paths.overrides_file.read_text().splitlines() == list(job.overrides)
    assert f"data.train_files={job.paths.train_parquet}" in job.overrides
    assert f"actor_rollout_ref.rollout.agent.agent_loop_config_path={job.paths.agent_loop_config}" in job.overrides
    assert (
        "data.train_batch_size=12" in job.overrides and "algorithm.rollout_correction.bypass_mode=True" in job.overrides
    )
    assert yaml.safe_load(job.paths.agent_loop_config.read_text()) == [
        {"name": "tracelearn_replay", "_target_": "tracelearn_replay_loop.ReplayAgentLoop", "replay_logprobs": True}
    ]
    assert (job.paths.python_directory / "tracelearn_replay_loop.py").is_file()
    assert job.environment == {"PYTHONPATH": str(job.paths.python_directory)}
    assert verl_command(job, "/envs/verl/bin/python") == [
        "/envs/verl/bin/python",
        "-m",
        "verl.trainer.main_ppo",
        *job.overrides,
    ]


def test_launch_script_checks_verl_then_runs_it_with_exactly_the_overrides(job: VerlJob, tmp_path: Path) -> None:
    python = fake_verl(tmp_path / "env", VERL_PIN)
    assert os.access(job.paths.launch_script, os.X_OK)
    environment = {**os.environ, "TRACELEARN_VERL_PYTHON": str(python), "PYTHONPATH": "/site/extra"}
    launched = subprocess.run([job.paths.launch_script], env=environment, capture_output=True, text=True, check=False)
    assert launched.returncode == 0, launched.stderr
    record = recorded(tmp_path / "env")
    assert record["argv"] == list(job.overrides)
    assert record["cwd"] == str(job.paths.directory)
    # the fake environment's own site first (its python wrapper adds it), then the job's loop, then the caller's
    assert record["pythonpath"] == f"{tmp_path / 'env' / 'site'}:{job.paths.python_directory}:/site/extra"
    assert not (tmp_path / "env" / "merge.json").exists()  # no LoRA, no merger

    del environment["TRACELEARN_VERL_PYTHON"]
    unset = subprocess.run([job.paths.launch_script], env=environment, capture_output=True, text=True, check=False)
    assert unset.returncode != 0 and "set TRACELEARN_VERL_PYTHON to the python of the verl environment" in unset.stderr


def test_launch_script_refuses_a_verl_outside_the_pinned_range_before_anything_runs(
    job: VerlJob, tmp_path: Path
) -> None:
    python = fake_verl(tmp_path / "env", "0.8.0")
    environment = {**os.environ, "TRACELEARN_VERL_PYTHON": str(python)}
    launched = subprocess.run([job.paths.launch_script], env=environment, capture_output=True, text=True, check=False)
    assert launched.returncode != 0
    assert f"verl 0.8.0 is installed; this job needs verl >=0.9.0,<0.10 (tested with {VERL_PIN})" in launched.stderr
    assert f"pip install 'verl[vllm]=={VERL_PIN}'" in launched.stderr
    assert not (tmp_path / "env" / "record.json").exists()


def test_a_lora_job_runs_verls_model_merger_on_the_last_step(built: Path, tmp_path: Path) -> None:
    config = TrainConfig(grpo=GrpoConfig(mini_batch_size=4), lora=LoraConfig(r=8, alpha=16))
    job = prepare_verl_job(built, tmp_path / "run", MODEL, config)
    assert json.loads((job.paths.directory / "job.json").read_text()) == {
        "model_path": MODEL,
        "lora": {"r": 8, "alpha": 16},
        "verl": VERL_PIN,
    }
    python = fake_verl(tmp_path / "env", VERL_PIN)
    environment = {**os.environ, "TRACELEARN_VERL_PYTHON": str(python), "FAKE_VERL_STEPS": "2,10"}
    launched = subprocess.run([job.paths.launch_script], env=environment, capture_output=True, text=True, check=False)
    assert launched.returncode == 0, launched.stderr
    actor = job.paths.checkpoints / "global_step_10" / "actor"  # 10 after 2: by number, not by name
    merge = json.loads((tmp_path / "env" / "merge.json").read_text())
    assert merge == ["merge", "--backend", "fsdp", "--local_dir", str(actor), "--target_dir", str(actor / "merged")]

    (tmp_path / "env" / "merge.json").unlink()
    assert run_verl_job(job, str(python), tmp_path / "logs" / "verl.log") == 0
    assert json.loads((tmp_path / "env" / "merge.json").read_text()) == merge
    assert (tmp_path / "logs" / "merge.log").read_text().startswith(f"$ {python} -m verl.model_merger merge")


@pytest.mark.parametrize("exit_code", [0, 3])
def test_run_verl_job_streams_to_console_and_log_and_returns_the_exit_code(
    job: VerlJob, tmp_path: Path, capsys: pytest.CaptureFixture[str], exit_code: int
) -> None:
    python = standin_python(tmp_path, exit_code)
    log = tmp_path / "logs" / "verl.log"
    assert run_verl_job(job, str(python), log) == exit_code
    lines = log.read_text().splitlines()
    assert lines[0].startswith(f"$ {python} -m verl.trainer.main_ppo algorithm.adv_estimator=grpo")
    assert set(lines[1:]) == {"verl says hello", "step 1/1 done"}
    assert "verl says hello" in capsys.readouterr().out
    record = recorded(tmp_path)
    assert record["argv"] == verl_command(job, str(python))[1:]
    assert record["cwd"] == str(job.paths.directory)
    assert record["pythonpath"].split(os.pathsep)[0] == str(job.paths.python_directory)


def test_sigterm_to_the_runner_stops_the_job_and_returns_its_status(job: VerlJob, tmp_path: Path) -> None:
    started, stopped = tmp_path / "started", tmp_path / "stopped"
    python = tmp_path / "slow-python"
    python.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""\
            import pathlib, signal, sys, time
            def stop(signum, frame):
                pathlib.Path({str(stopped)!r}).write_text(signal.Signals(signum).name)
                sys.exit(7)
            signal.signal(signal.SIGTERM, stop)
            pathlib.Path({str(started)!r}).touch()
            time.sleep(60)
            """
        )
    )
    python.chmod(0o755)
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pickle, sys; from pathlib import Path; from tracelearn.training.verl_runtime import run_verl_job; "
            "job = pickle.loads(bytes.fromhex(sys.argv[1])); "
            "sys.exit(run_verl_job(job, sys.argv[2], Path(sys.argv[3])))",
            pickle.dumps(job).hex(),
            str(python),
            str(tmp_path / "verl.log"),
        ]
    )
    deadline = time.monotonic() + 30
    while not started.exists():
        assert runner.poll() is None and time.monotonic() < deadline, "the stand-in job never started"
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=30) == 7
    assert stopped.read_text() == "SIGTERM"


# Finding verl's environment ----------------------------------------------------------------------


FAKE_MAIN_PPO = """\
import json, os, pathlib, sys
here = pathlib.Path(__file__).resolve().parents[3]
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH", "")}
(here / "record.json").write_text(json.dumps(record))
for step in filter(None, os.environ.get("FAKE_VERL_STEPS", "").split(",")):
    pathlib.Path("checkpoints", f"global_step_{step}", "actor").mkdir(parents=True, exist_ok=True)
"""
FAKE_MERGER = """\
import json, pathlib, sys
(pathlib.Path(__file__).resolve().parents[3] / "merge.json").write_text(json.dumps(sys.argv[1:]))
"""


def fake_verl(directory: Path, version: str, with_agent_loop: bool = True) -> Path:
    """An executable Python whose path holds a ``verl`` package of ``version``, with or without the agent
    loop; its ``verl.trainer.main_ppo`` and ``verl.model_merger`` record their arguments in ``directory``."""
    package = directory / "site" / "verl"
    for sub in ("experimental", "trainer", "model_merger"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (package / "trainer" / "main_ppo.py").write_text(FAKE_MAIN_PPO)
    (package / "model_merger" / "__main__.py").write_text(FAKE_MERGER)
    if with_agent_loop:
        (package / "experimental" / "agent_loop").mkdir()
        (package / "experimental" / "agent_loop" / "__init__.py").write_text("")
    python = directory / "verl-python"
    site = directory / "site"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


def test_our_own_python_has_no_verl_and_the_error_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRACELEARN_VERL_PYTHON", raising=False)
    with pytest.raises(VerlNotAvailableError) as error:
        find_verl_python(sys.executable)
    message = str(error.value)
    assert sys.executable in message and "No module named 'verl'" in message
    assert f"pip install 'verl[vllm]=={VERL_PIN}'" in message and "CUDA" in message
    assert "--verl-python" in message and "TRACELEARN_VERL_PYTHON" in message
    assert "runs without it" in message

    monkeypatch.setenv("TRACELEARN_VERL_PYTHON", sys.executable)
    with pytest.raises(VerlNotAvailableError, match=r"from \$TRACELEARN_VERL_PYTHON\) has no usable verl"):
        find_verl_python(None)
    monkeypatch.delenv("TRACELEARN_VERL_PYTHON")
    with pytest.raises(VerlNotAvailableError, match="no Python for verl: pass --verl-python"):
        find_verl_python(None)
    with pytest.raises(
        VerlNotAvailableError, match=r"/nowhere/python \(from --verl-python\) is not an executable Python"
    ):
        find_verl_python("/nowhere/python")


def test_a_python_with_verl_is_found_only_in_the_pinned_range_and_with_the_agent_loop_api(tmp_path: Path) -> None:
    good = fake_verl(tmp_path / "good", VERL_PIN)
    assert find_verl_python(str(good)) == str(good)
    assert find_verl_python(str(fake_verl(tmp_path / "dev", "0.9.2.dev4+g1234"))) is not None
    for version in ("0.8.0", "0.10.0", "1.0"):
        with pytest.raises(VerlNotAvailableError, match=rf"verl {re.escape(version)} is installed; this job needs "
                           r"verl >=0\.9\.0,<0\.10"):
            find_verl_python(str(fake_verl(tmp_path / version, version)))
    old = fake_verl(tmp_path / "old", VERL_PIN, with_agent_loop=False)
    no_loop = rf"verl {re.escape(VERL_PIN)} has no verl\.experimental\.agent_loop"
    with pytest.raises(VerlNotAvailableError, match=no_loop):
        find_verl_python(str(old))


def test_version_range_compares_release_numbers() -> None:
    assert version_in_range("0.9.0") and version_in_range("0.9.10") and version_in_range("0.9.1rc1")
    assert not version_in_range("0.8.9") and not version_in_range("0.10.0") and not version_in_range("0.10")


# The finished job's checkpoint -------------------------------------------------------------------


def write_checkpoint(job_directory: Path, step: int, files: dict[str, str]) -> Path:
    actor = job_directory / "checkpoints" / f"global_step_{step}" / "actor"
    for name, text in files.items():
        (actor / name).parent.mkdir(parents=True, exist_ok=True)
        (actor / name).write_text(text)
    return actor


def adapter_config(r: int = 8, alpha: int = 16, base: str | None = None) -> str:
    # what verl 0.9.1's model merger writes: peft's LoraConfig.to_dict(), no base model
    return json.dumps({"r": r, "lora_alpha": alpha, "base_model_name_or_path": base, "peft_type": "LORA"})


@pytest.fixture
def lora_job(built: Path, tmp_path: Path) -> VerlJob:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "vocab_size": 100}))
    config = TrainConfig(grpo=GrpoConfig(mini_batch_size=4), lora=LoraConfig(r=8, alpha=16))
    return prepare_verl_job(built, tmp_path / "run", str(base), config)


def test_a_full_fine_tuning_checkpoint_is_the_last_steps_huggingface_weights(job: VerlJob) -> None:
    write_checkpoint(job.paths.directory, 3, {"huggingface/model.safetensors": "w"})
    last = write_checkpoint(job.paths.directory, 12, {"huggingface/model.safetensors": "w"})
    assert latest_verl_checkpoint(job.paths.directory, lora=False) == last / "huggingface"
    write_checkpoint(job.paths.directory, 13, {"huggingface/config.json": "{}"})
    with pytest.raises(VerlCheckpointError, match="holds no model weights"):
        latest_verl_checkpoint(job.paths.directory, lora=False)


def test_the_lora_adapter_comes_from_the_merger_checked_against_the_job(lora_job: VerlJob) -> None:
    directory, base = lora_job.paths.directory, lora_job.model_path
    with pytest.raises(VerlCheckpointError, match="no global_step_N"):
        latest_verl_checkpoint(directory, lora=True)
    actor = write_checkpoint(directory, 1, {"huggingface/config.json": Path(base, "config.json").read_text()})
    with pytest.raises(VerlCheckpointError, match=r"python -m verl\.model_merger merge --backend fsdp"):
        latest_verl_checkpoint(directory, lora=True)
    write_checkpoint(directory, 1, {"merged/lora_adapter/adapter_config.json": adapter_config()})
    adapter = latest_verl_checkpoint(directory, lora=True)
    assert adapter == actor / "merged" / "lora_adapter"
    # the merger names no base model: the job's is recorded, so serving and the registry know it
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (adapter_config(r=16), "rank r=16, the job trained r=8"),
        (adapter_config(alpha=0), "lora_alpha=0, the job trained alpha=16 .*no lora_train_meta.json"),
        (adapter_config(base="/models/other"), "base_model_name_or_path='/models/other'"),
    ],
)
def test_an_adapter_that_does_not_fit_the_job_is_refused(lora_job: VerlJob, config: str, message: str) -> None:
    write_checkpoint(lora_job.paths.directory, 1, {"merged/lora_adapter/adapter_config.json": config})
    with pytest.raises(VerlCheckpointError, match=message):
        latest_verl_checkpoint(lora_job.paths.directory, lora=True)


def test_an_adapter_trained_on_another_architecture_is_refused(lora_job: VerlJob) -> None:
    other = json.dumps({"model_type": "qwen2", "hidden_size": 128, "vocab_size": 100})
    write_checkpoint(lora_job.paths.directory, 1, {"huggingface/config.json": other,
                                                   "lora_adapter/adapter_config.json": adapter_config()})
    with pytest.raises(VerlCheckpointError, match="hidden_size: 128 vs 64"):
        latest_verl_checkpoint(lora_job.paths.directory, lora=True)  # verl 0.7's layout, checked the same


# The replay loop ---------------------------------------------------------------------------------

STORED = {
    "prompt_ids": [1, 2, 3],
    "response_ids": [7, 8],
    "response_mask": [1, 0],
    "response_logprobs": [-0.5, -0.25],
    "advantage": -0.75,
}
ROW = {
    REPLAY_COLUMN: STORED,
    "extra_info": {"span_id": "00000000000000aa", "trace_id": "0" * 31 + "1", "task_id": "t9"},
}


def test_replay_output_is_the_stored_row() -> None:
    assert replay_output_fields(ROW, with_logprobs=True) == {
        "prompt_ids": [1, 2, 3],
        "response_ids": [7, 8],
        "response_mask": [1, 0],
        "response_logprobs": [-0.5, -0.25],
        "reward_score": -0.75,
        "num_turns": 2,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"response_ids": None}, "tracelearn_replay.response_ids is missing; replay needs the token ids"),
        ({"prompt_ids": []}, "tracelearn_replay.prompt_ids is empty"),
        ({"response_mask": [1]}, "response_mask has 1 entries for 2 response tokens"),
        ({"response_mask": [1, 2]}, "response_mask holds values other than 0 and 1"),
        ({"response_logprobs": None}, "tracelearn_replay.response_logprobs is missing"),
        ({"response_logprobs": [-0.5]}, "response_logprobs has 1 entries for 2 response tokens"),
        ({"advantage": None}, "advantage is None"),
    ],
)
def test_rows_that_cannot_be_replayed_are_refused_naming_the_span(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ReplayRowError, match=message) as error:
        replay_output_fields({**ROW, REPLAY_COLUMN: {**STORED, **change}}, with_logprobs=True)
    assert "span 00000000000000aa" in str(error.value) and "task t9" in str(error.value)
    with pytest.raises(ReplayRowError, match=r"no tracelearn_replay column .* verl-replay export"):
        replay_output_fields({**STORED, "extra_info": ROW["extra_info"]}, with_logprobs=True)


def run_copied_loop(job: VerlJob, site: Path | None, code: str) -> Any:
    """Run ``code`` in a fresh, isolated Python that sees only the job's copied loop (and ``site``)."""
    path = [str(job.paths.python_directory)] + ([str(site)] if site else [])
    prelude = f"import json, sys\nsys.path[:0] = {path!r}\n"
    result = subprocess.run(
        [sys.executable, "-I", "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_copied_loop_needs_neither_tracelearn_nor_verl(job: VerlJob) -> None:
    answer = run_copied_loop(
        job,
        None,
        f"""\
        import tracelearn_replay_loop as loop
        fields = loop.replay_output_fields({ROW!r}, with_logprobs=False)
        imported = sorted(name for name in sys.modules if name.split(".")[0] in ("tracelearn", "verl"))
        print(json.dumps({{"fields": fields, "imported": imported, "class": hasattr(loop, "ReplayAgentLoop")}}))
        """,
    )
    assert answer == {
        "fields": {**replay_output_fields(ROW, with_logprobs=False)},
        "imported": [],
        "class": False,  # without verl there is nothing to subclass
    }


def test_the_job_computes_logprobs_at_the_temperature_its_rows_were_sampled_at(tmp_path: Path) -> None:
    write_spans(tmp_path / "data", temperature=lambda task, rollout: 0.7)
    build_transitions(tmp_path / "data", tmp_path / "out", now=NOW)
    job = prepare_verl_job(tmp_path / "out", tmp_path / "run", MODEL, CONFIG)
    assert job.data.temperature == 0.7
    assert "actor_rollout_ref.rollout.temperature=0.7" in job.overrides
    stored = pq.read_table(job.paths.train_parquet)[REPLAY_COLUMN].to_pylist()
    assert {row["temperature"] for row in stored} == {0.7}


def test_rows_sampled_at_several_temperatures_are_refused_with_their_counts(tmp_path: Path) -> None:
    # Unknown temperatures count as 1: 1.0 and None are one temperature; 0.7 is another.
    write_spans(tmp_path / "data", temperature=lambda task, rollout: {0: 0.7, 1: 1.0}.get(rollout))
    build_transitions(tmp_path / "data", tmp_path / "out", now=NOW)
    with pytest.raises(VerlJobError, match=r"2 temperatures \(3 at 0.7, 9 at 1; unknown counts as 1\)"):
        prepare_verl_job(tmp_path / "out", tmp_path / "run", MODEL, CONFIG)
