"""Run by the verl environment's Python (``contract_envs.py``), never by tracelearn's: puts tracelearn's
job files through verl's own code and prints what verl made of them, as JSON.

    python verl_probe.py REQUEST.json    # prints {"check": {...facts...} | {"error": "..."}, ...}

The request names the override lists, the prepared job directory, the exported RL and SFT files
and a tokenizer directory. Each check reports facts (what verl holds, computes, decodes) and the
pytest side (``test_verl_contract.py``) asserts them, so a failure names the check and verl's own
error. Imports verl and its dependencies only; tracelearn is not installed here.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import sys
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf, open_dict


def composed(overrides: list[str]) -> DictConfig:
    """verl's own ``ppo_trainer`` config with ``overrides``, as ``python -m verl.trainer.main_ppo`` composes it."""
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides, return_hydra_config=True)


def without_hydra(config: DictConfig) -> DictConfig:
    with open_dict(config):
        del config["hydra"]
    return config


def plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | list) or OmegaConf.is_config(
        value
    ) else value


def check_config(overrides: dict[str, list[str]]) -> dict[str, Any]:
    """Each override list composes, resolves and passes verl's ``validate_config``; the values verl holds."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    defaults = without_hydra(composed([]))
    facts: dict[str, Any] = {
        "verl_version": importlib.import_module("verl").__version__,
        "defaults": {
            "trainer.use_v1": defaults.trainer.use_v1,
            "trainer.v1.trainer_mode": defaults.trainer.v1.trainer_mode,
            "actor_rollout_ref.rollout.calculate_log_probs": defaults.actor_rollout_ref.rollout.calculate_log_probs,
            "algorithm.rollout_correction.rollout_is": defaults.algorithm.rollout_correction.rollout_is,
        },
        "jobs": {},
    }
    for name, job_overrides in overrides.items():
        config = composed(job_overrides)
        values = {}
        for item in job_overrides:
            key = item.split("=", 1)[0]
            values[key] = plain(OmegaConf.select(config, key, throw_on_missing=True))
        config = without_hydra(config)  # Hydra's own section resolves only inside a run
        OmegaConf.to_container(config, resolve=True)  # every interpolation of verl's config resolves
        try:
            validate_config(
                config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
            )
        except ValueError as error:
            # validate_config's last check (a LoRA rank against vLLM's allowed ranks) imports vLLM, which this
            # environment leaves out; every check before it has passed when that import is what fails.
            if "vllm version None not supported" not in str(error):
                raise
            facts.setdefault("needs_vllm", []).append(name)
        facts["jobs"][name] = values
    return facts


def _subscript_keys(path: str, function: str | None = None) -> set[str]:
    """String keys a verl source file subscripts (``x["key"]``) or lists as field names, optionally in one function."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    roots: list[ast.AST] = [tree]
    if function is not None:
        roots = [node for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
                 and node.name == function]
    keys = set()
    for root in roots:
        for node in ast.walk(root):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                keys.add(str(node.slice.value))
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
                names = [getattr(target, "id", "") for target in node.targets]
                if any(name in ("fields", "select_fields") for name in names):
                    keys |= {str(e.value) for e in node.value.elts if isinstance(e, ast.Constant)}
    return keys


def verl_sample_keys(output: Any) -> dict[str, list[str]]:
    """The keys verl's own code gives a sample, from verl's own classes and sources."""
    from verl.experimental.agent_loop.agent_loop import _InternalAgentLoopOutput

    def origin(module: str) -> str:
        # by path: importing verl.trainer.ppo.v1 needs TransferQueue, which this environment leaves out
        return str(Path(importlib.import_module("verl").__file__).parent.joinpath(*module.split(".")[1:])) + ".py"

    return {
        "AgentLoopOutput.as_dict": sorted(output.as_dict()),
        "_InternalAgentLoopOutput": sorted(_InternalAgentLoopOutput.model_fields),
        "agent_loop_tq._agent_loop_postprocess": sorted(
            _subscript_keys(origin("verl.trainer.ppo.v1.agent_loop_tq"), "_agent_loop_postprocess")
        ),
        "v1.trainer_base": sorted(_subscript_keys(origin("verl.trainer.ppo.v1.trainer_base"))),
    }


def check_agent_loop(job: dict[str, Any], tokenizer_dir: str) -> dict[str, Any]:
    """The job's copied loop, loaded and called as verl's V1 agent-loop worker does, on the job's own rows."""
    import hydra
    from tensordict import NonTensorData, NonTensorStack
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop import agent_loop as verl_agent_loop
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, DictConfigWrap, ToolListWrap
    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    directory = Path(job["directory"])
    config = without_hydra(composed(job["overrides"]))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset = RLHFDataset(data_files=[str(directory / "train.parquet")], tokenizer=tokenizer, config=config.data)
    batch_dict = collate_fn([dataset[i] for i in range(len(dataset))])
    batch_dict["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(dataset))], dtype=object)  # the trainer's
    batch = tu.get_tensordict(batch_dict)
    rollout = config.actor_rollout_ref.rollout

    sys.path.insert(0, str(directory / "python"))  # the job's PYTHONPATH
    for entry in OmegaConf.load(rollout.agent.agent_loop_config_path):
        verl_agent_loop._agent_loop_registry[entry.name] = entry
    agent_name = rollout.agent.default_agent_loop
    sampling_params = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                           repetition_penalty=1.0, logprobs=rollout.calculate_log_probs)
    rows, outputs, samples = [], [], []
    for i in range(len(batch)):
        prompt: dict[str, Any] = {}
        for key, value in batch.items():  # as AgentLoopWorkerTQ.generate_sequences splits the batch
            if isinstance(value, torch.Tensor):
                prompt[key] = value[i]
            elif isinstance(value, NonTensorStack):
                prompt[key] = value[i].data
            elif isinstance(value, NonTensorData):
                prompt[key] = value.data
        kwargs = {**prompt, "global_steps": 1, "session_id": 0}
        loop = hydra.utils.instantiate(
            config=verl_agent_loop._agent_loop_registry[agent_name],
            trainer_config=DictConfigWrap(config=config), server_manager=None, tokenizer=tokenizer, processor=None,
            hf_model_type=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data),
            tools=ToolListWrap([]),
        )
        output = asyncio.run(loop.run(sampling_params, **kwargs))
        assert isinstance(output, AgentLoopOutput), type(output)
        sample = output.as_dict()
        sample.update(kwargs)  # AgentLoopWorkerTQ._agent_loop_postprocess: field.update(kwargs)
        sample["loss_mask"] = sample["response_mask"]
        rows.append(kwargs)
        outputs.append(output)
        samples.append(sample)

    # verl's GRPO estimator over the replayed batch (rollout.n=1: each uid a group of one).
    width = max(len(output.response_ids) for output in outputs)
    scores = torch.zeros(len(outputs), width)
    mask = torch.zeros(len(outputs), width)
    for row, sample in enumerate(samples):
        length = sample["responses"].shape[0]
        scores[row, :length] = sample["rm_scores"]
        mask[row, :length] = sample["response_mask"].float()
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=scores, response_mask=mask, index=np.array([row["uid"] for row in rows], dtype=object),
        norm_adv_by_std_in_grpo=config.algorithm.norm_adv_by_std_in_grpo,
    )
    return {
        "loop_class": type(loop).__module__ + "." + type(loop).__qualname__,
        "dataset_keys": sorted(rows[0]),
        "verl_keys": verl_sample_keys(outputs[0]),
        "rows": [
            {
                "span_id": row["extra_info"]["span_id"],
                "stored": row["tracelearn_replay"],
                "sample": {
                    "prompts": sample["prompts"].tolist(),
                    "responses": sample["responses"].tolist(),
                    "response_mask": sample["response_mask"].tolist(),
                    "loss_mask_is_tensor": isinstance(sample["loss_mask"], torch.Tensor),
                    "rollout_log_probs": sample["rollout_log_probs"].tolist(),
                    "rm_scores": sample["rm_scores"].tolist(),
                },
                "advantages": advantages[index][mask[index] > 0].tolist(),
            }
            for index, (row, sample) in enumerate(zip(rows, samples, strict=True))
        ],
    }


def check_rl_dataset(path: str, tokenizer_dir: str) -> dict[str, Any]:
    """The RL export through ``RLHFDataset`` (verl applies the chat template to ``raw_prompt`` itself)."""
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = without_hydra(composed([])).data
    dataset = RLHFDataset(data_files=[path], tokenizer=tokenizer, config=config)
    items = [dataset[i] for i in range(len(dataset))]
    return {
        "rows": len(dataset),
        "raw_prompts": [item["raw_prompt"] for item in items],
        "indexes": [item["index"] for item in items],
        "prompt_tokens": [len(tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True))
                          for item in items],
    }


def check_sft_dataset(path: str, tokenizer_dir: str) -> dict[str, Any]:
    """The SFT export through ``MultiTurnSFTDataset``: the text it trains on and the part its loss covers."""
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset = MultiTurnSFTDataset(parquet_files=[path], tokenizer=tokenizer,
                                  config={"max_length": 512, "truncation": "error", "pad_mode": "no_padding"})
    item = dataset[0]
    ids, loss = item["input_ids"], item["loss_mask"]
    return {
        "rows": len(dataset),
        "text": tokenizer.decode(ids.tolist()),
        "trained_text": tokenizer.decode(ids[loss.bool()].tolist()),
    }


def check_merger(argv: list[str]) -> dict[str, Any]:
    """tracelearn's merge command through verl's model-merger argument parser."""
    from verl.model_merger.base_model_merger import parse_args

    saved = sys.argv
    sys.argv = ["python -m verl.model_merger", *argv]
    try:
        return {key: value for key, value in vars(parse_args()).items() if isinstance(value, str | bool | None)}
    finally:
        sys.argv = saved


def run(name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return check()
    except Exception:  # reported to the test, which names the check
        return {"error": f"{name}: {traceback.format_exc()}"}


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    tokenizer_dir = request["tokenizer"]
    results = {
        "config": run("config", lambda: check_config(request["overrides"])),
        "agent_loop": run("agent_loop", lambda: check_agent_loop(request["job"], tokenizer_dir)),
        "rl_dataset": run("rl_dataset", lambda: check_rl_dataset(request["rl_parquet"], tokenizer_dir)),
        "sft_dataset": run("sft_dataset", lambda: check_sft_dataset(request["sft_parquet"], tokenizer_dir)),
        "merger": run("merger", lambda: check_merger(request["merge_argv"])),
    }
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
