"""GRPO advantages per task group, and the zero-signal counts reports need.

Owns the ``advantages`` stage of the experience pipeline (config
``advantage: {method: grpo, group_by: task_id, normalize_std: true, level: rollout}``): a pure
function ``LazyFrame -> LazyFrame`` over transitions (one row per LLM call) that adds ``advantage``
and ``zero_signal``, and :func:`zero_signal_counts` that summarizes its output.

Formula (DeepSeekMath GRPO outcome advantage), for a sample with score ``r`` in group ``G``::

    A = (r - mean(G)) / (std(G) + epsilon)      normalize_std=True
    A =  r - mean(G)                            normalize_std=False (Dr. GRPO)

``std`` is the unbiased sample standard deviation (``ddof=1``), as verl computes it with
``torch.std``. A group whose scores are all identical (this includes a group of one sample) carries
no learning signal: its samples get ``A = 0`` exactly and ``zero_signal = True``. (verl instead
uses mean 0 and std 1 for a group of one, which gives ``A = r``; we give 0, since one sample says
nothing about how good it is relative to its siblings.)

Levels:

- ``rollout`` (Agent Lightning v1): the samples are the rollouts of the group, scored by their
  episode ``reward``; the advantage is computed once per rollout and copied to each of its calls, so
  a rollout with many calls does not weigh more in the group statistics than a short one.
- ``transition`` (Agent Lightning v0): the samples are the calls of all rollouts of the group,
  scored by their ``credited_reward``; long rollouts weigh more.

Null group keys form one group together (polars groups nulls together). Samples with a null score
get a null advantage and are left out of their group's statistics.
"""

from __future__ import annotations

import math

import polars as pl

__all__ = ["ADVANTAGE_LEVELS", "grpo_advantages", "zero_signal_counts"]

ADVANTAGE_LEVELS: tuple[str, ...] = ("rollout", "transition")
"""Levels accepted by :func:`grpo_advantages`."""

_ROLLOUT = "rollout_id"
_ADVANTAGE = "advantage"
_ZERO_SIGNAL = "zero_signal"
_SCORE = "__advantage_score"  # temporary column, dropped before returning


def _group_keys(group_by: str | list[str]) -> list[str]:
    keys = [group_by] if isinstance(group_by, str) else list(group_by)
    if not keys or not all(isinstance(key, str) and key for key in keys):
        raise ValueError(f"advantage group_by={group_by!r} must be a column name or a non-empty list of them")
    return keys


def _score_advantages(samples: pl.LazyFrame, keys: list[str], normalize_std: bool, epsilon: float) -> pl.LazyFrame:
    """Add ``advantage`` and ``zero_signal`` from the ``_SCORE`` column, grouped by ``keys``."""
    score = pl.col(_SCORE)
    centered = score - score.mean().over(keys)
    advantage = centered / (score.std(ddof=1).over(keys) + epsilon) if normalize_std else centered
    # count() ignores nulls: a group with at most one scored sample has no spread to learn from.
    zero_signal = (score.count().over(keys) <= 1) | (score.max().over(keys) == score.min().over(keys))
    return samples.with_columns(
        pl.when(zero_signal & score.is_not_null()).then(pl.lit(0.0)).otherwise(advantage).alias(_ADVANTAGE),
        zero_signal.alias(_ZERO_SIGNAL),
    )


def grpo_advantages(
    transitions: pl.LazyFrame,
    group_by: str | list[str] = "task_id",
    normalize_std: bool = True,
    level: str = "rollout",
    epsilon: float = 1e-6,
) -> pl.LazyFrame:
    """Add GRPO ``advantage`` (Float64) and ``zero_signal`` (Boolean) to every transition.

    ``level="rollout"``: reads ``rollout_id``, the ``group_by`` columns and ``reward`` (the episode
    reward; the group key and reward are taken from the rollout's first row, they are expected to
    be the same on all its calls). Groups the rollouts, one sample per rollout, and joins the
    result back to every call of the rollout.

    ``level="transition"``: reads the ``group_by`` columns and ``credited_reward``; every call is a
    sample of its group.

    ``normalize_std=False`` is Dr. GRPO (``A = r - mean``). ``zero_signal`` is True on every row of
    a group whose scores are all identical (or that has at most one scored sample); those rows get
    ``advantage = 0``. Existing ``advantage`` / ``zero_signal`` columns are replaced. Raises
    ``ValueError`` for an unknown ``level``, an empty ``group_by`` or a negative ``epsilon``.
    """
    keys = _group_keys(group_by)
    if level not in ADVANTAGE_LEVELS:
        raise ValueError(f"advantage level {level!r} is unknown; use one of {', '.join(ADVANTAGE_LEVELS)}")
    if isinstance(epsilon, bool) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"advantage epsilon={epsilon!r} must be a finite number >= 0")

    transitions = transitions.drop(_ADVANTAGE, _ZERO_SIGNAL, strict=False)
    if level == "transition":
        samples = transitions.with_columns(pl.col("credited_reward").cast(pl.Float64).alias(_SCORE))
        return _score_advantages(samples, keys, normalize_std, epsilon).drop(_SCORE)

    rollouts = transitions.group_by(_ROLLOUT).agg(
        *(pl.col(key).first() for key in keys if key != _ROLLOUT),
        pl.col("reward").first().cast(pl.Float64).alias(_SCORE),
    )
    per_rollout = _score_advantages(rollouts, keys, normalize_std, epsilon).select(_ROLLOUT, _ADVANTAGE, _ZERO_SIGNAL)
    return transitions.join(per_rollout, on=_ROLLOUT, how="left", maintain_order="left")


def zero_signal_counts(advantaged: pl.LazyFrame, group_by: str | list[str] = "task_id") -> dict[str, int]:
    """Count groups and rollouts without learning signal in the output of :func:`grpo_advantages`.

    Reads ``rollout_id``, the ``group_by`` columns (the same as given to ``grpo_advantages``) and
    ``zero_signal``. Returns ``groups`` (number of groups), ``zero_signal_groups`` (groups whose
    scores are all identical), ``rollouts`` (distinct rollouts) and
    ``rollouts_in_zero_signal_groups``. Collects the frame.
    """
    keys = _group_keys(group_by)
    per_group = advantaged.group_by(keys).agg(
        pl.col(_ZERO_SIGNAL).any().alias("zero"),
        pl.col(_ROLLOUT).n_unique().alias("n"),
    )
    row = (
        per_group.select(
            pl.len().alias("groups"),
            pl.col("zero").sum().alias("zero_signal_groups"),
            pl.col("n").sum().alias("rollouts"),
            pl.col("n").filter(pl.col("zero")).sum().alias("rollouts_in_zero_signal_groups"),
        )
        .collect()
        .row(0, named=True)
    )
    return {name: int(value or 0) for name, value in row.items()}
