"""The GRPO loss: clipped policy gradient with importance ratios, the k3 KL estimate, loss aggregation.

Pure functions of tensors, no model and no state, each with its formula; the trainers call them
per micro-batch. Shapes: ``[sequences, response tokens]``, with ``mask`` 1 where the loss applies
(response tokens the pipeline's loss mask keeps) and 0 on padding and masked tokens.

For one response token t of a sequence with advantage A, log-probability ``logp`` under the policy
being trained, ``old`` under the policy that generated it (recorded at capture; for data of another
model version weighed by importance, under the starting weights), ``ref`` under the reference policy,
and ``w`` the truncated importance weight of off-policy data (1 otherwise; detached)::

    w_t   = min(exp(start_t - recorded_t), cap)                  (off-policy rows only, see importance_weights)
    r_t   = exp(logp_t - old_t)
    pg_t  = -w_t * min(r_t * A, clip(r_t, 1 - clip_low, 1 + clip_high) * A)
    kl_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3: unbiased, always >= 0)
    loss_t = pg_t + beta * kl_t

Aggregation over one optimizer step (all its micro-batches), so that gradient accumulation gives the
same gradient as one big batch (``step_tokens`` and ``step_sequences`` count the whole step)::

    token_mean: sum_i sum_t m_it loss_it / step_tokens
    seq_mean:   sum_i (sum_t m_it loss_it / sum_t m_it) / step_sequences
    dr_grpo:    sum_i sum_t m_it loss_it / (step_sequences * normalizer)     (Dr. GRPO: a constant, no length bias)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PolicyLoss", "aggregate_loss", "importance_weights", "k3_kl", "policy_gradient_loss", "token_logprobs"]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` per position, computed in float32 whatever the logits' dtype.

    ``logits``: ``[rows, positions, vocab]``; ``targets``: ``[rows, positions]`` token ids;
    ``temperatures``: ``[rows]``, the temperature each row was sampled at (None: 1 everywhere), as the
    server divided the logits before sampling. Uses ``logsumexp`` rather than a full ``log_softmax`` so
    only one ``[..., vocab]`` float32 tensor is alive at a time.
    """
    logits = logits.float()
    if temperatures is not None:
        logits = logits / temperatures.to(logits.dtype).view(-1, *([1] * (logits.dim() - 1)))
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def importance_weights(start_logprobs: torch.Tensor, recorded_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(start - recorded), cap)`` per token (TIS).

    ``start``: logprobs under the weights training starts from; ``recorded``: under the version that
    generated the data. The exponent is capped before ``exp`` so a recorded floor (-9999) gives ``cap``, not inf.
    """
    return torch.exp(torch.clamp(start_logprobs - recorded_logprobs, max=math.log(cap)))


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(ref - logp) - (ref - logp) - 1``."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass(frozen=True)
class PolicyLoss:
    """Per-token loss terms of one micro-batch (``[sequences, tokens]``), before aggregation."""

    loss: torch.Tensor
    policy_gradient: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor  # 1.0 where the clipped term was the one chosen (no gradient flows there)
    kl: torch.Tensor | None


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    kl_beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> PolicyLoss:
    """The clipped surrogate per token (module docstring's ``loss_t``).

    ``advantages`` is ``[sequences]`` (one per sequence, broadcast over its tokens) or
    ``[sequences, tokens]``. With ``kl_beta > 0``, ``ref_logprobs`` is required. ``weights``
    (``[sequences, tokens]``, None: 1) are the importance weights of off-policy data, taken as constants.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped_term = clipped_ratio * advantages
    policy_gradient = -torch.minimum(unclipped, clipped_term)
    if weights is not None:
        policy_gradient = policy_gradient * weights.detach()
    clipped = (clipped_term < unclipped).to(logprobs.dtype)
    kl = None
    loss = policy_gradient
    if kl_beta > 0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs (the reference policy's logprobs)")
        kl = k3_kl(logprobs, ref_logprobs)
        loss = policy_gradient + kl_beta * kl
    return PolicyLoss(loss=loss, policy_gradient=policy_gradient, ratio=ratio, clipped=clipped, kl=kl)


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    step_tokens: int,
    step_sequences: int,
    dr_grpo_normalizer: int | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the step loss (module docstring's formulas; shares sum to the step loss)."""
    masked = token_loss * mask
    if mode == "token_mean":
        return masked.sum() / max(step_tokens, 1)
    if mode == "seq_mean":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum() / max(step_sequences, 1)
    if mode == "dr_grpo":
        if dr_grpo_normalizer is None or dr_grpo_normalizer < 1:
            raise ValueError("dr_grpo aggregation needs a constant normalizer of at least 1 token")
        return masked.sum() / (max(step_sequences, 1) * dr_grpo_normalizer)
    raise ValueError(f"unknown loss aggregation {mode!r}; use token_mean, seq_mean or dr_grpo")
