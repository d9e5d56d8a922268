"""Credit assignment (LightningRL): which share of a rollout's reward each LLM call receives.

Owns the ``credit`` stage of the experience pipeline: pure functions ``LazyFrame -> LazyFrame`` over
transitions (one row per LLM call) that read ``rollout_id``, ``step_index`` and ``reward`` (the
rollout's primary episode reward, repeated on each of its calls) and add ``credited_reward``.

Methods (config ``credit: {method: ...}``), with ``R`` the episode reward, ``T`` the number of calls
of the rollout and ``t`` a call's 0-based position in call order (``step_index`` ranked within the
rollout, so gaps in ``step_index`` do not matter):

- ``identical``: every call gets ``R`` (Agent Lightning's choice).
- ``discounted``: ``gamma ** (T - 1 - t) * R``, the return seen from step ``t`` when ``R`` arrives
  after the last call.
- ``last_step``: ``R`` on the last call, ``0`` on the others.
- ``process``: intermediate rewards are credited to the call made just before them, plus
  (optionally) ``R`` on the last call. See :func:`credit_process` for the exact rule.

``assign_credit`` dispatches by method name and validates the parameters.
"""

from __future__ import annotations

import math

import polars as pl

__all__ = [
    "CREDIT_METHODS",
    "assign_credit",
    "credit_discounted",
    "credit_identical",
    "credit_last_step",
    "credit_process",
]

CREDIT_METHODS: tuple[str, ...] = ("identical", "discounted", "last_step", "process")
"""Method names accepted by :func:`assign_credit`."""

_ROLLOUT = "rollout_id"
_STEP = "step_index"
_REWARD = "reward"
_CREDITED = "credited_reward"
# Temporary columns; dropped before returning.
_CALL_STEP = "__credit_call_step"
_PROCESS_SUM = "__credit_process_sum"


def credit_identical(transitions: pl.LazyFrame) -> pl.LazyFrame:
    """Every call gets the episode return: ``credited_t = R``.

    Reads ``reward``; adds ``credited_reward`` (Float64; null where ``reward`` is null).
    """
    return transitions.with_columns(pl.col(_REWARD).cast(pl.Float64).alias(_CREDITED))


def credit_discounted(transitions: pl.LazyFrame, gamma: float) -> pl.LazyFrame:
    """Discount the episode return over call order: ``credited_t = gamma ** (T - 1 - t) * R``.

    ``T`` is the number of calls of the rollout and ``t`` the call's 0-based rank by ``step_index``
    within it, so the last call gets ``R`` and each earlier call one more factor ``gamma``.
    ``gamma = 1`` is :func:`credit_identical`.

    Reads ``rollout_id``, ``step_index``, ``reward``; adds ``credited_reward`` (Float64; null where
    ``reward`` is null).
    """
    position = pl.col(_STEP).rank("ordinal").over(_ROLLOUT).cast(pl.Int64) - 1
    n_calls = pl.len().over(_ROLLOUT).cast(pl.Int64)
    factor = pl.lit(float(gamma), dtype=pl.Float64).pow(n_calls - 1 - position)
    return transitions.with_columns((pl.col(_REWARD).cast(pl.Float64) * factor).alias(_CREDITED))


def credit_last_step(transitions: pl.LazyFrame) -> pl.LazyFrame:
    """Only the last call is credited: ``credited_t = R if t == T - 1 else 0``.

    The last call is the one with the largest ``step_index`` in its rollout.

    Reads ``rollout_id``, ``step_index``, ``reward``; adds ``credited_reward`` (Float64; null on the
    last call where ``reward`` is null, 0 on the other calls).
    """
    is_last = pl.col(_STEP) == pl.col(_STEP).max().over(_ROLLOUT)
    credited = pl.when(is_last).then(pl.col(_REWARD).cast(pl.Float64)).otherwise(pl.lit(0.0))
    return transitions.with_columns(credited.alias(_CREDITED))


def credit_process(
    transitions: pl.LazyFrame,
    process_rewards: pl.LazyFrame,
    include_final_reward: bool = True,
) -> pl.LazyFrame:
    """Credit intermediate (process) rewards to the call made just before each was emitted.

    ``process_rewards`` has one row per emitted reward: ``rollout_id``, ``after_step`` (integer:
    the ``step_index`` of the last call made before the reward was emitted) and ``value`` (float).

    Rule: a reward with ``after_step = s`` goes to the call of the same rollout with the largest
    ``step_index <= s`` (so ``after_step`` need not name an existing step: a reward emitted after
    step 3 of a rollout whose calls are 0, 2, 5 goes to step 2). Then::

        credited_t = sum(value of rewards credited to call t)
                     + (R if include_final_reward and t == T - 1 else 0)

    A call with no process reward gets 0 (plus ``R`` if it is the last). A missing episode reward
    (``reward`` null) counts as 0 here. Rewards emitted before the rollout's first call
    (``after_step`` smaller than every ``step_index``), or for rollouts without transitions, have
    no call before them and are dropped. The credited rewards of a rollout therefore sum to
    ``R`` plus its process rewards emitted at or after its first call.

    Reads ``rollout_id``, ``step_index``, ``reward``; adds ``credited_reward`` (Float64, never null).
    """
    calls = (
        transitions.select(pl.col(_ROLLOUT), pl.col(_STEP).cast(pl.Int64).alias(_CALL_STEP)).unique().sort(_CALL_STEP)
    )
    events = process_rewards.select(
        pl.col(_ROLLOUT),
        pl.col("after_step").cast(pl.Int64),
        pl.col("value").cast(pl.Float64),
    ).sort("after_step")
    # Both sides are sorted on their asof key above; polars cannot verify that within `by` groups.
    per_call = (
        events.join_asof(
            calls, left_on="after_step", right_on=_CALL_STEP, by=_ROLLOUT, strategy="backward", check_sortedness=False
        )
        .filter(pl.col(_CALL_STEP).is_not_null())
        .group_by(_ROLLOUT, _CALL_STEP)
        .agg(pl.col("value").sum().alias(_PROCESS_SUM))
    )
    is_last = pl.col(_STEP) == pl.col(_STEP).max().over(_ROLLOUT)
    final = pl.lit(0.0)
    if include_final_reward:
        final = pl.when(is_last).then(pl.col(_REWARD).cast(pl.Float64).fill_null(0.0)).otherwise(pl.lit(0.0))
    return (
        transitions.with_columns(pl.col(_STEP).cast(pl.Int64).alias(_CALL_STEP))
        .join(per_call, on=[_ROLLOUT, _CALL_STEP], how="left", maintain_order="left")
        .with_columns((pl.col(_PROCESS_SUM).fill_null(0.0) + final).alias(_CREDITED))
        .drop(_CALL_STEP, _PROCESS_SUM)
    )


def assign_credit(
    transitions: pl.LazyFrame,
    method: str,
    gamma: float = 1.0,
    process_rewards: pl.LazyFrame | None = None,
    include_final_reward: bool = True,
) -> pl.LazyFrame:
    """Add ``credited_reward`` to ``transitions`` with the credit method named ``method``.

    ``method`` is one of :data:`CREDIT_METHODS`. ``gamma`` (in ``(0, 1]``) is used by
    ``discounted`` only; ``process_rewards`` (columns ``rollout_id``, ``after_step``, ``value``) and
    ``include_final_reward`` by ``process`` only. Raises ``ValueError`` naming the bad value and the
    allowed ones when the method is unknown, ``gamma`` is out of range or set for another method,
    or ``process_rewards`` is missing for ``process`` or given to another method.
    """
    if method not in CREDIT_METHODS:
        raise ValueError(f"credit method {method!r} is unknown; use one of {', '.join(CREDIT_METHODS)}")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma):
        raise ValueError(f"credit gamma={gamma!r} must be a finite number in (0, 1]")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"credit gamma={gamma!r} is out of range; use a value in (0, 1] (1 = no discount)")
    if method != "discounted" and gamma != 1.0:
        raise ValueError(
            f"credit gamma={gamma!r} is only used by method 'discounted', not {method!r}; "
            "drop gamma or use method 'discounted'"
        )
    if method == "process" and process_rewards is None:
        raise ValueError("credit method 'process' needs process_rewards (columns rollout_id, after_step, value)")
    if method != "process" and process_rewards is not None:
        raise ValueError(f"process_rewards are only used by credit method 'process', not {method!r}")

    if method == "identical":
        return credit_identical(transitions)
    if method == "discounted":
        return credit_discounted(transitions, gamma)
    if method == "last_step":
        return credit_last_step(transitions)
    assert process_rewards is not None
    return credit_process(transitions, process_rewards, include_final_reward=include_final_reward)
