"""GRPO on stored transitions with torch: one process, CPU or one GPU, full fine-tuning or LoRA.

The transitions already carry everything the loss needs: the response token ids as generated,
their logprobs under the policy that generated them (the importance ratio's denominator), the GRPO
advantage the pipeline computed per task group, and the loss mask. One optimizer step reads top to
bottom::

    for each mini-batch of sequences (shuffled, seeded):
        for each micro-batch (length-sorted, under the token budget):
            logprobs = policy(batch)                                    # forward
            loss = aggregate(policy_gradient_loss(logprobs, old, A))    # training/losses.py
            loss.backward()                                             # gradients accumulate
        clip gradients; optimizer step; log the step

Logprobs missing from the data (a server that returned none, retokenized rows) are computed with
the starting weights before the first step and counted (``logprobs_recomputed``); with ``kl_beta``
> 0 the reference logprobs (the starting weights) are computed in the same pass.

Every logprob is computed on the logits divided by the temperature the transition was sampled at,
so on-policy data starts at a ratio of 1. Transitions of another model version than the starting
one are weighed by truncated importance weights, dropped or kept (``off_policy``), truncated
sampling kept or dropped (``sampling``): ``tracelearn.training.behaviour``; the counts are in the
run's summary (``sampling``, ``off_policy``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tracelearn.registry import Registry
from tracelearn.training.behaviour import select_behaviour, weigh_off_policy
from tracelearn.training.config import TrainConfig
from tracelearn.training.data import NoTrainingDataError
from tracelearn.training.losses import aggregate_loss, k3_kl, policy_gradient_loss
from tracelearn.training.policy import MicroBatch, Policy
from tracelearn.training.runs import TrainedSteps, TrainResult, finish_run, start_run
from tracelearn.training.sequences import (
    SequenceCounts,
    TokenSequence,
    micro_batches,
    mini_batches,
    padding_fraction,
    sequences_from_transitions,
)

__all__ = ["NoTrainingDataError", "TrainResult", "fill_logprobs", "grpo_step", "train_grpo"]

# Below this an advantage is a zero: a group whose rollouts all scored the same.
ZERO_ADVANTAGE = 1e-12


@torch.no_grad()
def fill_logprobs(policy: Policy, sequences: Sequence[TokenSequence], token_budget: int, *, old: bool,
                  reference: bool, progress: bool) -> int:
    """With the current weights, fill the old logprobs of sequences that lack them (``old``) and the
    reference logprobs of all (``reference``), in one pass; returns how many old ones were filled.
    """
    wanted = [s for s in sequences if reference or (old and s.old_logprobs is None)]
    if not wanted:
        return 0
    filled = 0
    was_training = policy.model.training
    policy.model.eval()
    pad = int(policy.tokenizer.pad_token_id)
    with tqdm(total=len(wanted), desc="logprobs", unit="seq", disable=not progress) as bar:
        for batch in micro_batches(wanted, token_budget, policy.prefix_to_share(wanted)):
            tensors = MicroBatch.of(batch, pad, policy.device, policy.min_shared_prefix)
            values = policy.logprobs(tensors).float().cpu()
            for row, sequence in enumerate(batch):
                computed = values[row, : len(sequence.response_ids)].tolist()
                if reference:
                    sequence.ref_logprobs = computed
                if old and sequence.old_logprobs is None:
                    sequence.old_logprobs = computed
                    filled += 1
            bar.update(len(batch))
    policy.model.train(was_training)
    return filled


def grpo_step(policy: Policy, step: Sequence[TokenSequence], config: TrainConfig, optimizer: torch.optim.Optimizer,
              dr_grpo_normalizer: int) -> dict[str, Any]:
    """One optimizer step over ``step`` (gradient accumulation over its micro-batches); returns its metrics."""
    grpo = config.grpo
    batches = list(micro_batches(step, config.runtime.micro_batch_tokens, policy.prefix_to_share(step)))
    step_tokens = sum(s.loss_tokens for s in step)
    sums = {"loss": 0.0, "pg": 0.0, "kl": 0.0, "kl_behaviour": 0.0, "clipped": 0.0, "ratio": 0.0}
    ratio_max, computed = 0.0, 0
    pad = int(policy.tokenizer.pad_token_id)
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        tensors = MicroBatch.of(batch, pad, policy.device, policy.min_shared_prefix)
        computed += tensors.computed_tokens
        assert tensors.old_logprobs is not None, "old logprobs are filled before training"
        logprobs = policy.logprobs(tensors)
        terms = policy_gradient_loss(logprobs, tensors.old_logprobs, tensors.advantages, clip_low=grpo.clip_low,
                                     clip_high=grpo.clip_high, kl_beta=grpo.kl_beta, ref_logprobs=tensors.ref_logprobs,
                                     weights=tensors.importance_weights)
        loss = aggregate_loss(terms.loss, tensors.mask, grpo.loss_aggregation, step_tokens=step_tokens,
                              step_sequences=len(step), dr_grpo_normalizer=dr_grpo_normalizer)
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            mask = tensors.mask
            sums["loss"] += float(loss)
            sums["pg"] += float((terms.policy_gradient * mask).sum())
            sums["clipped"] += float((terms.clipped * mask).sum())
            sums["ratio"] += float((terms.ratio * mask).sum())
            sums["kl_behaviour"] += float((k3_kl(logprobs, tensors.old_logprobs) * mask).sum())
            if terms.kl is not None:
                sums["kl"] += float((terms.kl * mask).sum())
            ratio_max = max(ratio_max, float((terms.ratio * mask).max()))
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), grpo.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = max(step_tokens, 1)
    rewards = [s.reward for s in step if s.reward is not None]
    return {
        "loss": sums["loss"],
        "pg_loss": sums["pg"] / tokens,
        "kl": sums["kl"] / tokens if grpo.kl_beta > 0 else None,
        "kl_to_behaviour": sums["kl_behaviour"] / tokens,
        "clip_fraction": sums["clipped"] / tokens,
        "ratio_mean": sums["ratio"] / tokens,
        "ratio_max": ratio_max,
        "grad_norm": float(grad_norm),
        "skipped_non_finite_gradient": not bool(torch.isfinite(grad_norm)),
        "sequences": len(step),
        "response_tokens": step_tokens,
        "sequence_tokens": sum(s.length for s in step),
        "computed_tokens": computed,
        "padding_fraction": padding_fraction(batches),
        "micro_batches": len(batches),
        "advantage_mean": sum(s.advantage for s in step) / len(step),
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
    }


def _select(sequences: list[TokenSequence], counts: SequenceCounts, config: TrainConfig) -> list[TokenSequence]:
    if not config.grpo.skip_zero_advantage or config.grpo.kl_beta > 0:
        return sequences
    kept = [s for s in sequences if abs(s.advantage) > ZERO_ADVANTAGE]
    counts.drop("zero_advantage", len(sequences) - len(kept))
    counts.kept = len(kept)
    return kept


def _warmup_factor(warmup_steps: int) -> Any:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def train_grpo(
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
    """Train ``model`` with GRPO on the transitions under ``transitions``; write the run into ``out``.

    ``registry`` resolves a ``registry:`` model (``None``: the default registry).

    Raises :class:`NoTrainingDataError` when no sequence carries a learning signal (every group's
    rewards were equal, or no transition has usable token ids), before any step is taken.
    """
    start = start_run("grpo", transitions, model, out, config, config_hash=config_hash, overwrite=overwrite,
                      registry=registry)
    policy, run = start.policy, start.run
    sequences, counts = sequences_from_transitions(start.data.frame, policy.tokenizer,
                                                   max_sequence_tokens=config.runtime.max_sequence_tokens)
    sequences = _select(sequences, counts, config)
    if not sequences:
        raise NoTrainingDataError(
            f"{start.data.root}: no transition carries a learning signal ({counts.to_dict()}); GRPO needs groups "
            "whose rollouts scored differently: run more samples per task (e.g. the agent's --samples 8)"
        )
    sequences, behaviour = select_behaviour(sequences, counts, config, policy.model_version)
    if not sequences:
        raise NoTrainingDataError(
            f"{start.data.root}: every transition was left out by the sampling / off_policy settings "
            f"({counts.to_dict()}); set off_policy.mode: importance or sampling.truncated: keep in train.yaml"
        )
    if config.grpo.recompute_logprobs == "always":
        for sequence in sequences:
            sequence.old_logprobs = None
    weighed = sum(s.behaviour_logprobs is not None for s in sequences)
    recomputed = fill_logprobs(policy, sequences, config.runtime.micro_batch_tokens, old=True,
                               reference=config.grpo.kl_beta > 0, progress=progress) - weighed
    weigh_off_policy(sequences, behaviour)
    dr_grpo_normalizer = config.grpo.dr_grpo_normalizer or max(len(s.response_ids) for s in sequences)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.grpo.learning_rate,
                                  weight_decay=config.grpo.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(config.grpo.warmup_steps))
    steps_per_epoch = math.ceil(len(sequences) / config.grpo.mini_batch_size)
    total_steps = steps_per_epoch * config.grpo.epochs
    step_number, trained_tokens, train_seconds = 0, 0, 0.0
    with tqdm(total=total_steps, desc="grpo", unit="step", disable=not progress) as bar:
        for epoch in range(config.grpo.epochs):
            for step in mini_batches(sequences, config.grpo.mini_batch_size, seed=config.runtime.seed + epoch):
                began = time.monotonic()
                metrics = grpo_step(policy, step, config, optimizer, dr_grpo_normalizer)
                schedule.step()
                elapsed = time.monotonic() - began
                step_number += 1
                train_seconds += elapsed
                trained_tokens += int(metrics["sequence_tokens"])
                metrics.update(step=step_number, epoch=epoch, lr=float(schedule.get_last_lr()[0]),
                               step_seconds=elapsed,
                               tokens_per_second=metrics["sequence_tokens"] / max(elapsed, 1e-9),
                               elapsed_seconds=time.monotonic() - start.started)
                run.log_step(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", clip=f"{metrics['clip_fraction']:.2f}")
                bar.update(1)
    final = run.read_metrics()[-1]
    return finish_run(start, TrainedSteps(
        counts=counts, sequences=len(sequences), steps=step_number, epochs=config.grpo.epochs,
        tokens=trained_tokens, seconds=train_seconds,
        metrics={"train_loss_final": final["loss"], "train_clip_fraction_final": final["clip_fraction"],
                 "train_kl_to_behaviour_final": final["kl_to_behaviour"]},
        plot_title=f"GRPO on {start.data.root.name} ({len(sequences)} sequences)",
        summary_extra={"logprobs_recomputed": recomputed, **behaviour.to_dict()},
    ))
