"""Failures from a real transitions dataset (the calc agent's captured rollouts, built by the pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracelearn.training.apo.failures import NoFailuresError, load_failures, render_failures, sample_failures


def test_every_failed_rollout_is_a_failure_with_its_conversation(failing_transitions: Path) -> None:
    pool = load_failures(failing_transitions)
    assert (pool.rollouts, len(pool.failures), pool.without_reward) == (4, 4, 0)
    assert {failure.task_id for failure in pool.failures} == {"calc-001", "calc-002", "calc-003", "calc-004"}
    failure = pool.failures[0]
    assert failure.reward == 0.0
    assert [m["role"] for m in failure.messages] == ["system", "user"]
    assert failure.response[-1]["content"] == "I think it is -1"
    text = render_failures(pool.failures[:1])
    assert f"(task {failure.task_id}, reward 0)" in text
    assert "agent's final reply: I think it is -1" in text
    assert "Use the calculator tool" not in text, "the prompt under revision is shown on its own, not per run"
    assert pool.describe().startswith("4 of 4 rollouts in ")


def test_sampling_is_seeded_and_without_replacement(failing_transitions: Path) -> None:
    pool = load_failures(failing_transitions)
    def ids(key: str | int, count: int = 3) -> tuple[str, ...]:
        return tuple(failure.rollout_id for failure in sample_failures(pool, count, key))

    first = ids("0:1:seed:0")
    assert first == ids("0:1:seed:0") and len(set(first)) == 3
    assert sorted(ids(1, count=10)) == sorted(f.rollout_id for f in pool.failures), "all of them, once each"
    assert len({ids(key) for key in range(8)}) > 1, "other keys draw other samples"


def test_transitions_without_a_failure_stop_with_a_message_saying_what_to_do(passing_transitions: Path) -> None:
    with pytest.raises(NoFailuresError, match=r"0 of 2 rollouts .* have a reward below 1: the transitions have no "
                                              r"failures to learn from. Collect rollouts where the agent fails"):
        load_failures(passing_transitions)
    assert len(load_failures(passing_transitions, threshold=1.5).failures) == 2, "a higher threshold finds some"
