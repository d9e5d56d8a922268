"""How each transition was sampled, and by which model version: what the trainer keeps, drops and weighs.

The behaviour policy of a transition is the model version that generated it (``model_version``) at
its sampling parameters (``temperature``, ``top_p``, ``top_k``). The policy's logprobs are computed
at the recorded temperature (``TokenSequence.sampling_temperature``, in ``Policy.logprobs``);
this module decides, per ``train.yaml``'s ``sampling`` and ``off_policy`` sections
(``tracelearn.training.config``), what happens to the rest, and counts it for the run's summary:

* truncated sampling (``top_p`` < 1 or ``top_k`` > 0): kept (the ratio's numerator is the untruncated
  tempered distribution) or dropped;
* another model version than the one training starts from: weighed by truncated importance weights
  (``min(exp(logp_start - logp_recorded), cap)``, the ratio's denominator then being the starting
  weights' logprobs), dropped, or kept as if on-policy. A transition without a version is on-policy
  (counted as ``version_unknown``): data captured before versions were recorded, or by a server that
  names none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tracelearn.training.config import TrainConfig
from tracelearn.training.losses import importance_weights
from tracelearn.training.sequences import SequenceCounts, TokenSequence

__all__ = ["BehaviourCounts", "select_behaviour", "version_counts", "weigh_off_policy"]

UNKNOWN = "unknown"


def _temperature_key(sequence: TokenSequence) -> str:
    return UNKNOWN if sequence.temperature is None else f"{sequence.temperature:g}"


def version_counts(sequences: Sequence[TokenSequence]) -> dict[str, int]:
    """How many sequences each model version generated (``unknown``: no version recorded)."""
    counted = Counter(s.model_version or UNKNOWN for s in sequences)
    return dict(sorted(counted.items()))


@dataclass
class BehaviourCounts:
    """What the run did with the sampling parameters and model versions of its sequences (summary JSON)."""

    start_version: str
    off_policy_mode: str
    cap: float
    truncated_mode: str
    temperatures: dict[str, int] = field(default_factory=dict)
    truncated_kept: int = 0
    truncated_dropped: int = 0
    on_policy: int = 0
    version_unknown: int = 0
    off_policy_weighted: int = 0
    off_policy_dropped: int = 0
    off_policy_kept: int = 0
    off_policy_without_logprobs: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    weight_mean: float | None = None
    weight_capped_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampling": {
                "temperatures": self.temperatures,
                "temperature_unknown": self.temperatures.get(UNKNOWN, 0),
                "truncated": self.truncated_mode,
                "truncated_kept": self.truncated_kept,
                "truncated_dropped": self.truncated_dropped,
            },
            "off_policy": {
                "mode": self.off_policy_mode,
                "cap": self.cap,
                "start_version": self.start_version,
                "versions": self.versions,
                "on_policy": self.on_policy,
                "version_unknown": self.version_unknown,
                "off_policy_weighted": self.off_policy_weighted,
                "off_policy_dropped": self.off_policy_dropped,
                "off_policy_kept": self.off_policy_kept,
                "off_policy_without_logprobs_dropped": self.off_policy_without_logprobs,
                "weight_mean": self.weight_mean,
                "weight_capped_fraction": self.weight_capped_fraction,
            },
        }


def select_behaviour(sequences: Sequence[TokenSequence], counts: SequenceCounts, config: TrainConfig,
                     start_version: str) -> tuple[list[TokenSequence], BehaviourCounts]:
    """The sequences to train on under ``config.sampling`` and ``config.off_policy``, starting from
    ``start_version``; drops are counted in ``counts`` (``truncated_sampling``, ``off_policy``,
    ``off_policy_without_logprobs``) and everything in the returned :class:`BehaviourCounts`.

    Off-policy sequences weighed by importance get their recorded logprobs moved to
    ``behaviour_logprobs`` and ``old_logprobs`` cleared, for the trainer to fill with the starting
    weights' before :func:`weigh_off_policy`.
    """
    mode = config.off_policy.mode
    behaviour = BehaviourCounts(start_version, mode, config.off_policy.cap, config.sampling.truncated,
                                versions=version_counts(sequences))
    kept: list[TokenSequence] = []
    for sequence in sequences:
        if sequence.truncated:
            if config.sampling.truncated == "drop":
                behaviour.truncated_dropped += 1
                counts.drop("truncated_sampling")
                continue
            behaviour.truncated_kept += 1
        if sequence.model_version is None:
            behaviour.version_unknown += 1
        elif sequence.model_version == start_version:
            behaviour.on_policy += 1
        elif mode == "drop":
            behaviour.off_policy_dropped += 1
            counts.drop("off_policy")
            continue
        elif mode == "keep":
            behaviour.off_policy_kept += 1
        elif sequence.old_logprobs is None:
            behaviour.off_policy_without_logprobs += 1
            counts.drop("off_policy_without_logprobs")
            continue
        else:
            behaviour.off_policy_weighted += 1
            sequence.behaviour_logprobs, sequence.old_logprobs = sequence.old_logprobs, None
        kept.append(sequence)
    behaviour.temperatures = dict(sorted(Counter(map(_temperature_key, kept)).items()))
    counts.kept = len(kept)
    return kept, behaviour


def weigh_off_policy(sequences: Sequence[TokenSequence], behaviour: BehaviourCounts) -> None:
    """Set each weighed sequence's ``importance_weights`` from its starting-weights logprobs (``old_logprobs``,
    filled by then) and its recorded ones; the mean weight and capped fraction over loss tokens go to
    ``behaviour``."""
    total, capped, tokens = 0.0, 0, 0
    for sequence in sequences:
        if sequence.behaviour_logprobs is None:
            continue
        assert sequence.old_logprobs is not None, "the starting weights' logprobs are filled first"
        weights = importance_weights(torch.tensor(sequence.old_logprobs), torch.tensor(sequence.behaviour_logprobs),
                                     behaviour.cap)
        sequence.importance_weights = weights.tolist()
        mask = torch.tensor(sequence.loss_mask, dtype=torch.bool)
        total += float(weights[mask].sum())
        capped += int((weights[mask] >= behaviour.cap * (1 - 1e-6)).sum())
        tokens += int(mask.sum())
    if tokens:
        behaviour.weight_mean = total / tokens
        behaviour.weight_capped_fraction = capped / tokens
