"""GRPO advantages: rollout vs transition level, Dr. GRPO, zero-signal groups, against hand-computed values."""

from __future__ import annotations

import math

import polars as pl
import pytest

from tracelearn.pipelines.advantages import grpo_advantages, zero_signal_counts


def _transitions() -> pl.LazyFrame:
    # Task t1: rollout "long" has 5 calls with reward 1.0, rollout "short" 1 call with reward 0.0.
    # Task t2: three 1-call rollouts with rewards 1.0, 0.0, 0.5.
    # Task t3: two 1-call rollouts, both reward 1.0 (identical: zero signal).
    # Task t4: a single 2-call rollout (a group of one: zero signal).
    rows = [("long", "t1", step, 1.0) for step in range(5)]
    rows += [("short", "t1", 0, 0.0), ("x", "t2", 0, 1.0), ("y", "t2", 0, 0.0), ("z", "t2", 0, 0.5)]
    rows += [("p", "t3", 0, 1.0), ("q", "t3", 0, 1.0), ("solo", "t4", 0, 0.3), ("solo", "t4", 1, 0.3)]
    frame = pl.LazyFrame(rows, schema=["rollout_id", "task_id", "step_index", "reward"], orient="row")
    return frame.with_columns(pl.col("reward").alias("credited_reward"))


def _by_call(frame: pl.LazyFrame) -> dict[tuple[str, int], tuple[float, bool]]:
    rows = frame.collect().select("rollout_id", "step_index", "advantage", "zero_signal").rows()
    return {(rollout, step): (advantage, zero) for rollout, step, advantage, zero in rows}


def test_rollout_level_long_and_short_rollout_get_one_advantage_each() -> None:
    out = _by_call(grpo_advantages(_transitions(), epsilon=0.0))
    # t1 rollouts (one sample each): rewards 1.0, 0.0 -> mean 0.5,
    # sample std sqrt((0.5**2 + 0.5**2) / (2 - 1)) = sqrt(0.5) = 0.70710678;
    # long: 0.5 / 0.70710678 = +0.70710678 on all 5 calls; short: -0.70710678.
    for step in range(5):
        assert out[("long", step)] == (pytest.approx(math.sqrt(0.5)), False)
    assert out[("short", 0)] == (pytest.approx(-math.sqrt(0.5)), False)
    # t2: rewards 1.0, 0.0, 0.5 -> mean 0.5, std sqrt((0.25 + 0.25 + 0) / 2) = 0.5 -> +1, -1, 0.
    assert out[("x", 0)][0] == pytest.approx(1.0)
    assert out[("y", 0)][0] == pytest.approx(-1.0)
    assert out[("z", 0)][0] == pytest.approx(0.0)


def test_epsilon_is_added_to_the_std() -> None:
    out = _by_call(grpo_advantages(_transitions(), epsilon=0.5))
    # t2: (1.0 - 0.5) / (0.5 + 0.5) = 0.5.
    assert out[("x", 0)][0] == pytest.approx(0.5)


def test_dr_grpo_does_not_divide_by_std() -> None:
    out = _by_call(grpo_advantages(_transitions(), normalize_std=False))
    # t1: 1.0 - 0.5 = +0.5 (long), 0.0 - 0.5 = -0.5 (short). t2: 0.5, -0.5, 0.0.
    assert out[("long", 3)][0] == pytest.approx(0.5)
    assert out[("short", 0)][0] == pytest.approx(-0.5)
    assert [out[(r, 0)][0] for r in ("x", "y", "z")] == pytest.approx([0.5, -0.5, 0.0])


def test_transition_level_weighs_long_rollouts_more() -> None:
    out = _by_call(grpo_advantages(_transitions(), level="transition", epsilon=0.0))
    # t1 samples are the 6 calls: five 1.0 and one 0.0 -> mean 5/6;
    # sample variance (5 * (1/6)**2 + (5/6)**2) / 5 = (5/36 + 25/36) / 5 = 1/6, std = 0.40824829;
    # long calls: (1/6) / 0.40824829 = 0.40824829; short call: (-5/6) / 0.40824829 = -2.04124145.
    std = math.sqrt(1 / 6)
    assert out[("long", 0)][0] == pytest.approx((1 / 6) / std)
    assert out[("short", 0)][0] == pytest.approx((-5 / 6) / std)
    rollout_level = _by_call(grpo_advantages(_transitions(), epsilon=0.0))
    assert out[("long", 0)][0] != pytest.approx(rollout_level[("long", 0)][0])


def test_transition_level_reads_credited_reward() -> None:
    # Last-step credit on t1: long calls 0,0,0,0,1 and short 0 -> mean 1/6, and the long rollout's
    # early calls get a negative advantage (0 - 1/6) under Dr. GRPO.
    frame = _transitions().with_columns(
        pl.when((pl.col("rollout_id") == "long") & (pl.col("step_index") < 4))
        .then(0.0)
        .otherwise(pl.col("credited_reward"))
        .alias("credited_reward")
    )
    out = _by_call(grpo_advantages(frame, level="transition", normalize_std=False))
    assert out[("long", 0)][0] == pytest.approx(-1 / 6)
    assert out[("long", 4)][0] == pytest.approx(5 / 6)


def test_zero_signal_groups_are_flagged_zeroed_and_counted() -> None:
    advantaged = grpo_advantages(_transitions())
    out = _by_call(advantaged)
    assert out[("p", 0)] == (0.0, True)
    assert out[("q", 0)] == (0.0, True)
    # A group of one rollout: advantage 0, zero signal (on both of its calls).
    assert out[("solo", 0)] == (0.0, True)
    assert out[("solo", 1)] == (0.0, True)
    # Groups t1..t4; t3 and t4 are zero-signal with 2 + 1 rollouts; 2 + 3 + 2 + 1 = 8 rollouts.
    assert zero_signal_counts(advantaged) == {
        "groups": 4,
        "zero_signal_groups": 2,
        "rollouts": 8,
        "rollouts_in_zero_signal_groups": 3,
    }


def test_output_keeps_calls_and_replaces_existing_advantage() -> None:
    frame = _transitions().with_columns(pl.lit(None, dtype=pl.Float64).alias("advantage"))
    out = grpo_advantages(frame, group_by=["task_id"]).collect()
    assert out.height == 13
    assert out.columns[-2:] == ["advantage", "zero_signal"]
    assert out["advantage"].null_count() == 0


def test_invalid_level_and_group_by_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"advantage level 'call' is unknown; use one of rollout, transition"):
        grpo_advantages(_transitions(), level="call")
    with pytest.raises(ValueError, match=r"group_by=\[\] must be a column name"):
        grpo_advantages(_transitions(), group_by=[])
    with pytest.raises(ValueError, match=r"epsilon=-1.0 must be a finite number >= 0"):
        grpo_advantages(_transitions(), epsilon=-1.0)
