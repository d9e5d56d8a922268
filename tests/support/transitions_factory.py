"""Transitions datasets for trainer tests: real TRANSITIONS Parquet files with real token ids.

Each :class:`Sample` is one LLM call (a chat prompt and the reply), tokenized with a real tokenizer's
chat template as a server would have (prompt ids with the generation prompt, reply ids ending with
the end-of-turn token), with optional logprobs and an advantage, written where the pipeline writes
them: ``<root>/transitions/date=D/part-<hash16>.parquet`` with the schema version in the metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tracelearn.models import resolve_model
from tracelearn.pipelines.build import output_file_name
from tracelearn.schemas.migrations import conform
from tracelearn.schemas.tables import TRANSITIONS
from tracelearn.storage.atomic_parquet import write_parquet_atomically

CONFIG_HASH = hashlib.sha256(b"trainer-tests").hexdigest()


@dataclass(frozen=True)
class Sample:
    question: str
    reply: str
    advantage: float
    reward: float = 0.0
    task_id: str = "t0"
    with_token_ids: bool = True
    logprob: float | None = -1.0  # the same logprob for every reply token; None: not recorded


def encode(tokenizer: Any, question: str, reply: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    response = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
    return [int(i) for i in prompt], [int(i) for i in response]


def transitions_table(tokenizer: Any, samples: Sequence[Sample], config_hash: str = CONFIG_HASH) -> pa.Table:
    rows = []
    for number, sample in enumerate(samples):
        prompt, response = encode(tokenizer, sample.question, sample.reply)
        rows.append({
            "rollout_id": f"r{number}",
            "task_id": sample.task_id,
            "group_id": sample.task_id,
            "step_index": 0,
            "model": "tiny",
            "prompt_messages": json.dumps([{"role": "user", "content": sample.question}]),
            "response": json.dumps([{"role": "assistant", "content": sample.reply}]),
            "prompt_token_ids": prompt if sample.with_token_ids else None,
            "response_token_ids": response if sample.with_token_ids else None,
            "response_logprobs": ([sample.logprob] * len(response)
                                  if sample.with_token_ids and sample.logprob is not None else None),
            "token_ids_source": "server" if sample.with_token_ids else None,
            "rewards": [("correct", sample.reward)],
            "reward": sample.reward,
            "credited_reward": sample.reward,
            "advantage": sample.advantage,
            "trace_id": f"{number:032x}",
            "span_id": f"{number:016x}",
            "pipeline_config_hash": config_hash,
        })
    return conform(pa.Table.from_pylist(rows, schema=TRANSITIONS.schema), TRANSITIONS)


def write_transitions(root: Path, tokenizer: Any, samples: Sequence[Sample], date: str = "2026-11-20",
                      config_hash: str = CONFIG_HASH) -> Path:
    """Write the samples as one transitions partition under ``root``; returns the file."""
    table = transitions_table(tokenizer, samples, config_hash).replace_schema_metadata(
        TRANSITIONS.schema_with_metadata().metadata
    )
    return write_parquet_atomically(table, root / "transitions" / f"date={date}", output_file_name(config_hash),
                                    "zstd")


def reply_logprob(model_dir: Path, question: str, reply: str) -> float:
    """Sum of the reply's token logprobs under the model in ``model_dir`` (a full model or an adapter)."""
    source = resolve_model(str(model_dir))
    if source.base is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(source.base.directory)
        model = PeftModel.from_pretrained(base, source.directory)
        tokenizer = AutoTokenizer.from_pretrained(source.base.directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt, response = encode(tokenizer, question, reply)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return sum(float(logprobs[len(prompt) - 1 + j, token]) for j, token in enumerate(response))
