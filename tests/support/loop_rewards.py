"""Reward functions for the loop tests (``support.loop_rewards:NAME``, with ``tests/`` on PYTHONPATH): the
tiny random model never solves a task, so these make rewards that do or do not differ within a group."""


def length_parity(answer: str) -> float:
    """1.0 for an answer of even length: rollouts of one task score differently (a learning signal)."""
    return float(len(answer) % 2 == 0)


def always_zero(answer: str) -> float:
    """Every rollout scores 0: no group has a learning signal."""
    return 0.0
