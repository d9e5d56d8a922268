"""Reward functions for the reward engine tests, referenced as ``reward_functions_fixture:NAME``."""

from typing import Any


def exact(answer: str, gold: str) -> float:
    """1.0 when the answer equals the gold answer (``tracelearn.metadata.gold``)."""
    return float(answer.strip() == gold.strip())


def graded(answer: str, metadata: dict[str, Any], rollout_id: str, task_id: str | None) -> dict[str, float]:
    """Several named rewards: correctness and brevity; reads metadata as a dict."""
    return {"correct": float(answer == metadata["gold"]), "short": 1.0 if len(answer) <= 2 else 0.0}


def fragile(answer: str, gold: str) -> Any:
    """Raises on one gold, returns garbage on another: failures the build counts."""
    if gold == "boom":
        raise RuntimeError("grader crashed")
    if gold == "nan":
        return float("nan")
    if gold == "text":
        return "correct"
    return 1.0


def with_default(answer: str, weight: str = "1") -> float:
    """A missing metadata key falls back to the parameter's default."""
    return float(weight)


def span_count(spans: list[dict[str, Any]], messages: list[dict[str, Any]]) -> float:
    """The number of spans, checking that messages hold the prompt and the response."""
    assert messages[-1]["role"] == "assistant"
    return float(len(spans))


def args_only(*args: Any) -> float:
    """Refused at load: the pipeline passes arguments by name."""
    return 0.0


def positional_only(answer: str, /) -> float:
    """Refused at load: positional-only parameters."""
    return 0.0
