"""Contract tests against the pinned verl release, on CPU: tracelearn's verl job files through verl's own code.

verl (``VERL_PIN``) is installed in an environment of its own (``contract_envs.py``, cached under
``build/framework-envs/``); ``verl_probe.py`` runs there and reports what verl made of:

- the Hydra overrides of real jobs (default, LoRA + Dr. GRPO + KL, rows without logprobs, several
  GPUs): verl's own ``ppo_trainer`` config composes with every one (Hydra refuses a key verl does not
  have), resolves, and passes verl's ``validate_config``, and holds each value as written;
- the replay job's rows and agent loop: verl's ``RLHFDataset`` and ``collate_fn`` read the Parquet,
  the copied loop is instantiated from ``agent_loop.yaml`` as verl's worker does, returns verl's
  ``AgentLoopOutput``, and the V1 merge (``as_dict()`` then ``update(dataset columns)``) keeps verl's
  tensors; verl's GRPO estimator turns the scores back into the stored advantages;
- the RL and SFT exports through ``RLHFDataset`` and ``MultiTurnSFTDataset`` with a local tokenizer;
- the model merger's command through verl's own argument parser.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from contracts import contract_envs
from integration.frameworks import envs
from support.spans_factory import SpansFactory, at
from support.tiny_model import build_tokenizer

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.export_verl import (
    REPLAY_COLUMN,
    REPLAY_SCHEMA,
    RL_SCHEMA,
    load_transitions,
    to_verl_rl,
    to_verl_sft,
    write_verl_export,
)
from tracelearn.schemas import semconv as sc
from tracelearn.training.config import GrpoConfig, LoraConfig, TrainConfig
from tracelearn.training.verl_backend import ReplayData, VerlJob, VerlPaths, prepare_verl_job, verl_overrides
from tracelearn.training.verl_checkpoints import merge_command
from tracelearn.training.verl_environment import VERL_PIN

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("verl_probe.py")
NOW = at(3600)
REWARDS = {"t0": [1.0, 0.0], "t1": [0.0, 1.0], "t2": [1.0, 0.5]}
MODEL = "/models/tiny"


def write_spans(data: Path) -> None:
    """Each rollout one LLM call with the server's token ids and logprobs, and a reward."""
    factory = SpansFactory(data / "spans")
    trace = 0
    for task_index, (task, rewards) in enumerate(REWARDS.items()):
        for rollout, value in enumerate(rewards):
            trace += 1
            root = factory.root(trace, 0, 100, task_id=task)
            factory.llm(trace, root, 1, user=f"{task}: solve", task_id=task, agent="solver")
            attributes = factory.records[-1].attributes
            assert isinstance(attributes, dict)
            attributes[sc.PROMPT_TOKEN_IDS] = [10 + task_index, 11, 12]
            attributes[sc.RESPONSE_TOKEN_IDS] = [20 + step for step in range(rollout + 2)]
            attributes[sc.RESPONSE_LOGPROBS] = [-0.25 * (step + 1) for step in range(rollout + 2)]
            attributes[sc.TOKEN_IDS_STATUS] = sc.TOKEN_IDS_FROM_SERVER
            factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


def tool_exchange() -> str:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 1, "b": 2})}}
    return json.dumps([{"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "c1", "content": "3"}])


def override_sets(job: VerlJob) -> dict[str, list[str]]:
    """The job's own overrides and those of the other settings the backend maps."""
    data, paths = job.data, job.paths

    def written(config: TrainConfig, replay: ReplayData = data, **options: Any) -> list[str]:
        return verl_overrides(config, MODEL, paths, replay, experiment_name="contract", **options)

    lora = TrainConfig(
        grpo=GrpoConfig(mini_batch_size=2, loss_aggregation="dr_grpo", dr_grpo_normalizer=3, kl_beta=0.05, epochs=2),
        lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
    )
    some_missing = ReplayData(data.train_rows, 0, data.max_prompt_tokens, data.max_response_tokens, 1)
    return {
        "job": list(job.overrides),
        "lora_dr_grpo_kl": written(lora),
        "rows_without_logprobs": written(TrainConfig(grpo=GrpoConfig(mini_batch_size=2)), some_missing),
        "seq_mean_gpus": written(TrainConfig(grpo=GrpoConfig(mini_batch_size=4, loss_aggregation="seq_mean")),
                                 n_gpus_per_node=2, nnodes=2),
    }


@pytest.fixture(scope="module")
def verl_python() -> Path:
    try:
        return contract_envs.create("verl")
    except envs.EnvSetupError as error:
        pytest.fail(f"the verl environment: {error}", pytrace=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("verl-contract")
    write_spans(root / "data")
    build_transitions(root / "data", root / "out", now=NOW)
    job = prepare_verl_job(root / "out", root / "run", MODEL, TrainConfig(grpo=GrpoConfig(mini_batch_size=2)))
    transitions = load_transitions(root / "out")
    rl = write_verl_export(to_verl_rl(transitions, val_fraction=0.0), root / "rl")[0]
    with_tools = transitions.with_columns(pl.lit(tool_exchange()).alias("response"))
    sft = write_verl_export(to_verl_sft(with_tools, val_fraction=0.0), root / "sft")[0]
    tokenizer = root / "tokenizer"
    build_tokenizer().save_pretrained(tokenizer)
    return {"job": job, "rl": rl, "sft": sft, "tokenizer": tokenizer, "root": root}


@pytest.fixture(scope="module")
def probe(verl_python: Path, exported: dict[str, Any]) -> dict[str, Any]:
    job: VerlJob = exported["job"]
    actor = job.paths.checkpoints / "global_step_1" / "actor"
    request = {
        "overrides": override_sets(job),
        "job": {"directory": str(job.paths.directory), "overrides": list(job.overrides)},
        "rl_parquet": str(exported["rl"]),
        "sft_parquet": str(exported["sft"]),
        "tokenizer": str(exported["tokenizer"]),
        "merge_argv": merge_command("python", actor)[3:],
    }
    path = exported["root"] / "request.json"
    path.write_text(json.dumps(request), encoding="utf-8")
    # -I: verl's environment alone (no PYTHONPATH, no user site); the job's loop is put on the path by the probe
    ran = subprocess.run([str(verl_python), "-I", str(PROBE), str(path)], capture_output=True, text=True,
                         timeout=600, check=False, cwd=exported["root"])
    assert ran.returncode == 0, ran.stderr[-4000:]
    results: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])
    return results


def facts(probe: dict[str, Any], check: str) -> dict[str, Any]:
    result: dict[str, Any] = probe[check]
    assert "error" not in result, result.get("error")
    return result


def same_value(written: str, held: Any) -> bool:
    """Whether verl holds the value an override wrote (Hydra's grammar, for the values tracelearn writes)."""
    value = yaml.safe_load(written)
    if isinstance(held, bool) or held is None or isinstance(value, list):
        return bool(value == held)
    try:
        return float(value) == float(held)
    except (TypeError, ValueError):
        return str(value) == str(held)


def test_the_tested_verl_is_the_pinned_release_and_its_defaults_are_why_keys_are_written(
    probe: dict[str, Any],
) -> None:
    config = facts(probe, "config")
    assert config["verl_version"] == VERL_PIN == contract_envs.PINS["verl"]
    # verl 0.9 defaults: the V1 trainer and rollout logprobs on, hence written explicitly by every job
    assert config["defaults"] == {
        "trainer.use_v1": True,
        "trainer.v1.trainer_mode": "sync",
        "actor_rollout_ref.rollout.calculate_log_probs": True,
        "algorithm.rollout_correction.rollout_is": None,
    }


def test_every_override_composes_resolves_and_validates_in_verls_own_config(
    probe: dict[str, Any], exported: dict[str, Any]
) -> None:
    jobs = facts(probe, "config")["jobs"]
    sets = override_sets(exported["job"])
    assert set(jobs) == set(sets)
    for name, overrides in sets.items():
        for item in overrides:
            key, written = item.split("=", 1)
            assert same_value(written, jobs[name][key]), f"{name}: {key} holds {jobs[name][key]!r}, written {written}"
    # verl's last validation, the LoRA rank against vLLM's allowed ranks, imports vLLM (not installed here)
    assert facts(probe, "config").get("needs_vllm", []) == ["lora_dr_grpo_kl"]
    assert jobs["lora_dr_grpo_kl"]["actor_rollout_ref.actor.loss_scale_factor"] == 3
    assert jobs["rows_without_logprobs"]["actor_rollout_ref.rollout.calculate_log_probs"] is False


def test_the_replay_column_collides_with_no_key_verl_gives_a_sample(probe: dict[str, Any]) -> None:
    loop = facts(probe, "agent_loop")
    verl_keys = set().union(*loop["verl_keys"].values())
    extra_columns = set(REPLAY_SCHEMA.names) - set(RL_SCHEMA.names)
    assert extra_columns == {REPLAY_COLUMN} and REPLAY_COLUMN in loop["dataset_keys"]
    assert not extra_columns & verl_keys
    # the layout before verl 0.9 (flat columns) would have replaced verl's own mask: the key set sees it
    assert {"response_mask", "loss_mask", "rollout_log_probs", "rm_scores"} <= verl_keys


def test_verl_samples_hold_the_stored_tokens_and_its_grpo_gives_back_the_stored_advantage(
    probe: dict[str, Any], exported: dict[str, Any]
) -> None:
    loop = facts(probe, "agent_loop")
    assert loop["loop_class"] == "tracelearn_replay_loop.ReplayAgentLoop"
    job: VerlJob = exported["job"]
    assert len(loop["rows"]) == job.data.train_rows == pq.read_table(job.paths.train_parquet).num_rows
    for row in loop["rows"]:
        stored, sample = row["stored"], row["sample"]
        assert sample["prompts"] == stored["prompt_ids"]
        assert sample["responses"] == stored["response_ids"]
        assert sample["response_mask"] == stored["response_mask"] and sample["loss_mask_is_tensor"]
        assert sample["rollout_log_probs"] == pytest.approx(stored["response_logprobs"])
        assert sample["rm_scores"][:-1] == [0.0] * (len(stored["response_ids"]) - 1)
        assert sample["rm_scores"][-1] == pytest.approx(stored["advantage"])
        assert row["advantages"] == pytest.approx([stored["advantage"]] * sum(stored["response_mask"]))


def test_the_rl_export_loads_in_rlhf_dataset(probe: dict[str, Any], exported: dict[str, Any]) -> None:
    dataset = facts(probe, "rl_dataset")
    table = pq.read_table(exported["rl"]).to_pylist()
    assert dataset["rows"] == len(table) == len(REWARDS)
    assert dataset["raw_prompts"] == [row["prompt"] for row in table]
    assert dataset["indexes"] == [row["extra_info"]["index"] for row in table]
    assert all(count > 0 for count in dataset["prompt_tokens"])


def test_the_sft_export_trains_on_tool_calls_with_arguments_as_objects(probe: dict[str, Any]) -> None:
    dataset = facts(probe, "sft_dataset")
    assert dataset["rows"] == sum(len(rewards) for rewards in REWARDS.values())
    # the chat template renders the arguments object as JSON once (JSON text would come out double-encoded)
    assert '"arguments": {"a": 1, "b": 2}' in dataset["text"]
    assert '"arguments": {"a": 1, "b": 2}' in dataset["trained_text"]  # the assistant's turn is trained
    assert "None" not in dataset["text"]  # no null field rendered


def test_the_merge_command_parses_with_verls_model_merger(probe: dict[str, Any], exported: dict[str, Any]) -> None:
    actor = exported["job"].paths.checkpoints / "global_step_1" / "actor"
    merger = facts(probe, "merger")
    assert (merger["operation"], merger["backend"]) == ("merge", "fsdp")
    assert (merger["local_dir"], merger["target_dir"]) == (str(actor), str(actor / "merged"))


def test_the_job_parquet_is_written_with_the_replay_schema(exported: dict[str, Any]) -> None:
    assert pq.read_schema(exported["job"].paths.train_parquet).remove_metadata() == REPLAY_SCHEMA
    assert isinstance(exported["job"].paths, VerlPaths)
