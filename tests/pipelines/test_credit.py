"""Credit assignment: each method against hand-computed values, and the dispatcher's errors."""

from __future__ import annotations

import polars as pl
import pytest

from tracelearn.pipelines.credit import (
    assign_credit,
    credit_discounted,
    credit_identical,
    credit_last_step,
    credit_process,
)


def _transitions() -> pl.LazyFrame:
    # Rollout "a": 3 calls, episode reward 1.0. Rollout "b": 1 call, episode reward 2.0.
    # Rows deliberately out of step order to check that order comes from step_index, not row order.
    return pl.LazyFrame(
        {
            "rollout_id": ["a", "a", "a", "b"],
            "step_index": [2, 0, 1, 0],
            "reward": [1.0, 1.0, 1.0, 2.0],
        },
        schema_overrides={"step_index": pl.Int32},
    )


def _credited(frame: pl.LazyFrame) -> dict[tuple[str, int], float]:
    rows = frame.collect().select("rollout_id", "step_index", "credited_reward").rows()
    return {(rollout, step): credited for rollout, step, credited in rows}


def test_identical_gives_every_call_the_episode_reward() -> None:
    assert _credited(credit_identical(_transitions())) == {("a", 0): 1.0, ("a", 1): 1.0, ("a", 2): 1.0, ("b", 0): 2.0}


def test_discounted_gamma_half_over_three_steps() -> None:
    # T = 3, R = 1: step 0 -> 0.5**2 = 0.25, step 1 -> 0.5**1 = 0.5, step 2 -> 0.5**0 = 1.0.
    # Rollout b has T = 1: its only call gets 0.5**0 * 2 = 2.0.
    assert _credited(credit_discounted(_transitions(), gamma=0.5)) == {
        ("a", 0): 0.25,
        ("a", 1): 0.5,
        ("a", 2): 1.0,
        ("b", 0): 2.0,
    }


def test_discounted_uses_call_rank_not_raw_step_index() -> None:
    # Steps 0, 5, 9 are positions 0, 1, 2 of T = 3: R = 4 -> 4*0.25 = 1.0, 4*0.5 = 2.0, 4*1 = 4.0.
    frame = pl.LazyFrame({"rollout_id": ["a"] * 3, "step_index": [0, 5, 9], "reward": [4.0] * 3})
    assert _credited(credit_discounted(frame, gamma=0.5)) == {("a", 0): 1.0, ("a", 5): 2.0, ("a", 9): 4.0}


def test_last_step_credits_only_the_last_call() -> None:
    assert _credited(credit_last_step(_transitions())) == {("a", 0): 0.0, ("a", 1): 0.0, ("a", 2): 1.0, ("b", 0): 2.0}


def test_process_rewards_go_to_the_call_before_them_plus_final_on_last() -> None:
    events = pl.LazyFrame(
        {
            # a: 0.1 after step 0 and 0.2 after step 0 -> step 0 gets 0.3;
            #    0.5 after step 1 -> step 1; 7.0 after step 10 -> last call before it, step 2;
            #    9.0 after step -1 (before the first call) -> dropped.
            # b: 0.25 after step 0 -> step 0.
            "rollout_id": ["a", "a", "a", "a", "a", "b"],
            "after_step": [0, 0, 1, 10, -1, 0],
            "value": [0.1, 0.2, 0.5, 7.0, 9.0, 0.25],
        }
    )
    credited = _credited(credit_process(_transitions(), events))
    # a: step 0 = 0.1 + 0.2 = 0.3; step 1 = 0.5; step 2 = 7.0 + R(1.0) = 8.0. b: 0.25 + R(2.0) = 2.25.
    assert credited == pytest.approx({("a", 0): 0.3, ("a", 1): 0.5, ("a", 2): 8.0, ("b", 0): 2.25})

    without_final = _credited(credit_process(_transitions(), events, include_final_reward=False))
    assert without_final == pytest.approx({("a", 0): 0.3, ("a", 1): 0.5, ("a", 2): 7.0, ("b", 0): 0.25})


def test_process_reward_between_sparse_steps_goes_to_the_earlier_call() -> None:
    # Calls at steps 0, 2, 5; a reward after step 3 was emitted after call 2 and before call 5.
    frame = pl.LazyFrame({"rollout_id": ["a"] * 3, "step_index": [0, 2, 5], "reward": [None, None, None]})
    events = pl.LazyFrame({"rollout_id": ["a"], "after_step": [3], "value": [1.5]})
    # Missing episode reward counts as 0, so the last call gets 0 + 0.
    assert _credited(credit_process(frame, events)) == {("a", 0): 0.0, ("a", 2): 1.5, ("a", 5): 0.0}


def test_assign_credit_dispatches_and_keeps_other_columns() -> None:
    out = assign_credit(_transitions().with_columns(pl.lit("t").alias("task_id")), "discounted", gamma=0.5).collect()
    assert out.columns == ["rollout_id", "step_index", "reward", "task_id", "credited_reward"]
    assert out.height == 4
    events = pl.LazyFrame({"rollout_id": ["b"], "after_step": [0], "value": [1.0]})
    assert _credited(assign_credit(_transitions(), "process", process_rewards=events))[("b", 0)] == 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "shaped"}, r"credit method 'shaped' is unknown; use one of identical, discounted"),
        ({"method": "discounted", "gamma": 0.0}, r"gamma=0.0 is out of range; use a value in \(0, 1\]"),
        ({"method": "discounted", "gamma": 1.5}, r"gamma=1.5 is out of range"),
        ({"method": "discounted", "gamma": float("nan")}, r"gamma=nan must be a finite number"),
        ({"method": "identical", "gamma": 0.9}, r"gamma=0.9 is only used by method 'discounted'"),
        ({"method": "process"}, r"'process' needs process_rewards"),
    ],
)
def test_assign_credit_rejects_bad_parameters(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_credit(_transitions(), **kwargs)  # type: ignore[arg-type]


def test_assign_credit_rejects_process_rewards_for_other_methods() -> None:
    events = pl.LazyFrame({"rollout_id": ["a"], "after_step": [0], "value": [1.0]})
    with pytest.raises(ValueError, match=r"only used by credit method 'process', not 'identical'"):
        assign_credit(_transitions(), "identical", process_rewards=events)
