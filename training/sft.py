"""SFT on good transitions (rejection-sampling fine-tuning), with transformers' ``Trainer``.

The transitions whose primary reward is at least ``sft.min_reward`` become training examples: the
stored prompt and response token ids (retokenized only where the server gave none, counted), with
labels on the response tokens only (prompt tokens and tokens the pipeline's loss mask excludes are
``-100``). Identical (prompt, response) pairs are kept once unless ``keep_duplicates``: a task the
policy already answers right every time would otherwise dominate the data.

``Trainer`` does the loop (gradient accumulation, clipping, the linear schedule, bf16 autocast,
length-grouped batches so padding does not dominate); a callback appends each logged step to the
run's ``metrics.jsonl``. The checkpoint, plot and lineage are written as for GRPO.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from tracelearn.registry import Registry
from tracelearn.training.behaviour import version_counts
from tracelearn.training.config import TrainConfig
from tracelearn.training.data import NoTrainingDataError
from tracelearn.training.run_dir import RunDirectory
from tracelearn.training.runs import TrainedSteps, TrainResult, finish_run, start_run
from tracelearn.training.sequences import SequenceCounts, TokenSequence, sequences_from_transitions

__all__ = ["IGNORE_INDEX", "ResponseOnlyCollator", "SftExamples", "select_sft_sequences", "train_sft"]

IGNORE_INDEX = -100  # transformers' label value for "no loss here"


def select_sft_sequences(sequences: Sequence[TokenSequence], counts: SequenceCounts, min_reward: float,
                         keep_duplicates: bool) -> list[TokenSequence]:
    """The sequences at or above ``min_reward``, duplicates dropped (both counted in ``counts``)."""
    chosen: list[TokenSequence] = []
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for sequence in sequences:
        if sequence.reward is None or sequence.reward < min_reward:
            counts.drop("below_min_reward")
            continue
        key = (tuple(sequence.prompt_ids), tuple(sequence.response_ids))
        if not keep_duplicates and key in seen:
            counts.drop("duplicate")
            continue
        seen.add(key)
        chosen.append(sequence)
    counts.kept = len(chosen)
    return chosen


class SftExamples(Dataset[dict[str, list[int]]]):
    """Token sequences as ``Trainer`` examples: ``input_ids``, ``labels`` (response only) and ``length``."""

    def __init__(self, sequences: Sequence[TokenSequence]) -> None:
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sequence = self.sequences[index]
        response_labels = [t if m else IGNORE_INDEX for t, m in zip(sequence.response_ids, sequence.loss_mask,
                                                                    strict=True)]
        return {
            "input_ids": sequence.prompt_ids + sequence.response_ids,
            "labels": [IGNORE_INDEX] * len(sequence.prompt_ids) + response_labels,
            "length": sequence.length,
        }


class ResponseOnlyCollator:
    """Right-pads a batch: ``input_ids`` with the pad token, ``labels`` with ``-100``, and the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class _MetricsToRun(TrainerCallback):
    """Appends every step ``Trainer`` logs (loss, learning rate, gradient norm) to the run's metrics."""

    def __init__(self, run: RunDirectory, rewards: float) -> None:
        self.run = run
        self.reward_mean = rewards
        self.started = time.monotonic()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
        if not logs or "loss" not in logs:
            return
        self.run.log_step({"step": state.global_step, "epoch": logs.get("epoch"), "loss": logs["loss"],
                           "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                           "reward_mean": self.reward_mean, "elapsed_seconds": time.monotonic() - self.started})


def train_sft(
    transitions: str | Path,
    model: str,
    out: str | Path,
    config: TrainConfig,
    *,
    config_hash: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    registry: Registry | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on the transitions at or above ``config.sft.min_reward``; write the run into ``out``.
    ``registry`` resolves a ``registry:`` model (``None``: the default registry).

    Raises :class:`NoTrainingDataError` when no transition passes the threshold.
    """
    sft = config.sft
    start = start_run("sft", transitions, model, out, config, config_hash=config_hash, overwrite=overwrite,
                      registry=registry)
    policy, run = start.policy, start.run
    sequences, counts = sequences_from_transitions(start.data.frame, policy.tokenizer, require_advantage=False,
                                                   max_sequence_tokens=config.runtime.max_sequence_tokens)
    chosen = select_sft_sequences(sequences, counts, sft.min_reward, sft.keep_duplicates)
    if not chosen:
        raise NoTrainingDataError(
            f"{start.data.root}: no transition has a reward of at least {sft.min_reward} ({counts.to_dict()}); "
            "lower --min-reward or collect more rollouts"
        )
    steps_per_epoch = math.ceil(len(chosen) / (sft.batch_size * sft.gradient_accumulation_steps))
    arguments = TrainingArguments(
        output_dir=str(run.path / "trainer"),
        per_device_train_batch_size=sft.batch_size,
        gradient_accumulation_steps=sft.gradient_accumulation_steps,
        num_train_epochs=sft.epochs,
        learning_rate=sft.learning_rate,
        weight_decay=sft.weight_decay,
        warmup_steps=math.ceil(sft.warmup_ratio * steps_per_epoch * sft.epochs),
        max_grad_norm=sft.max_grad_norm,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=policy.autocast is torch.bfloat16,
        use_cpu=policy.device.type == "cpu",
        seed=config.runtime.seed,
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    rewards = [s.reward for s in chosen if s.reward is not None]
    trainer = Trainer(
        model=policy.model,
        args=arguments,
        train_dataset=SftExamples(chosen),
        data_collator=ResponseOnlyCollator(int(policy.tokenizer.pad_token_id)),
        callbacks=[_MetricsToRun(run, sum(rewards) / len(rewards))],
    )
    # Without a progress bar Trainer prints every log dict instead; metrics.jsonl already has them.
    trainer.remove_callback(PrinterCallback)
    began = time.monotonic()
    output = trainer.train()
    history = run.read_metrics()
    return finish_run(start, TrainedSteps(
        counts=counts, sequences=len(chosen), steps=int(output.global_step), epochs=sft.epochs,
        tokens=sum(s.length for s in chosen) * sft.epochs, seconds=time.monotonic() - began,
        metrics={"train_loss_final": history[-1]["loss"] if history else output.training_loss,
                 "train_loss_mean": output.training_loss},
        plot_title=f"SFT on {start.data.root.name} ({len(chosen)} sequences, reward >= {sft.min_reward})",
        lineage_extra={"min_reward": sft.min_reward},
        # SFT uses no logprobs (sampling parameters and versions do not change its loss): counted only.
        summary_extra={"model_versions": version_counts(chosen), "start_version": policy.model_version},
    ))
