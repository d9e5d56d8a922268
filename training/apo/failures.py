"""The failures APO learns from: low-reward rollouts of a transitions dataset, sampled and rendered as text.

A rollout is represented by its last transition: that call's prompt messages hold the whole
conversation up to it (the user's task, earlier replies, tool calls and their results) and its
response is the agent's final reply, so one row shows what the agent saw, did and got. A rollout is
a failure when its primary reward is below the threshold; rollouts without a reward are not
failures (nothing says they failed) and are counted apart.

Sampling is seeded: the same pool, count and seed give the same failures, in the same order.

May import: tracelearn.pipelines (the transitions reader), polars.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tracelearn.pipelines.stats import scan_transitions, transitions_directory
from tracelearn.schemas.dataset import dataset_files

__all__ = ["Failure", "FailurePool", "NoFailuresError", "load_failures", "render_failures", "sample_failures"]

# A message longer than this is cut in the critique request: the optimizer needs the gist, not every token.
MESSAGE_CHARS = 600


class NoFailuresError(ValueError):
    """The transitions hold no rollout with a reward below the threshold: there is nothing to learn from."""


@dataclass(frozen=True)
class Failure:
    """One failed rollout: its final call's prompt messages and response (OpenAI-style dicts) and reward."""

    rollout_id: str
    task_id: str | None
    reward: float
    messages: tuple[dict[str, Any], ...]
    response: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class FailurePool:
    """Every failure of a transitions dataset, and what the rest of it held.

    ``rollouts``: rollouts in the dataset (of the chosen pipeline config); ``without_reward``: those
    without a primary reward; ``failures``: those below ``threshold``, sorted by rollout id.
    ``files`` are the transitions files read (name and size identify the snapshot).
    """

    root: Path
    config_hash: str
    threshold: float
    rollouts: int
    without_reward: int
    failures: tuple[Failure, ...]
    files: tuple[Path, ...]

    def describe(self) -> str:
        return (f"{len(self.failures)} of {self.rollouts} rollouts in {self.root} have a reward below "
                f"{self.threshold:g}" + (f" ({self.without_reward} without a reward, not counted)"
                                         if self.without_reward else ""))

    def snapshot(self) -> list[list[Any]]:
        """Names and sizes of the files read: what a resumed run must find unchanged."""
        return [[file.name, file.stat().st_size] for file in self.files]


def _messages(text: str | None, rollout_id: str, column: str) -> tuple[dict[str, Any], ...]:
    if text is None:
        return ()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"transitions: rollout {rollout_id}: column {column!r} is not JSON; rebuild the "
                         "transitions with `tracelearn transitions build`") from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    return tuple(message for message in parsed if isinstance(message, dict)) if isinstance(parsed, list) else ()


def load_failures(root: str | Path, threshold: float = 1.0, config_hash: str | None = None) -> FailurePool:
    """Every rollout of the transitions under ``root`` (a build output root or its ``transitions/``) whose
    primary reward is below ``threshold``.

    Raises :class:`NoFailuresError` when there is none, and what
    :func:`~tracelearn.pipelines.stats.scan_transitions` raises for a missing or ambiguous dataset.
    """
    frame, chosen = scan_transitions(root, config_hash)
    last_calls = (
        frame.sort("rollout_id", "step_index")
        .group_by("rollout_id", maintain_order=True)
        .agg(pl.col("task_id").last(), pl.col("reward").last(), pl.col("prompt_messages").last(),
             pl.col("response").last())
        .collect()
    )
    failed = last_calls.filter(pl.col("reward") < threshold)
    failures = tuple(
        Failure(rollout_id=row["rollout_id"], task_id=row["task_id"], reward=float(row["reward"]),
                messages=_messages(row["prompt_messages"], row["rollout_id"], "prompt_messages"),
                response=_messages(row["response"], row["rollout_id"], "response"))
        for row in failed.iter_rows(named=True)
    )
    pool = FailurePool(root=Path(root), config_hash=chosen, threshold=threshold, rollouts=last_calls.height,
                       without_reward=last_calls["reward"].null_count(), failures=failures,
                       files=tuple(dataset_files(transitions_directory(root))))
    if not failures:
        raise NoFailuresError(f"{pool.describe()}: the transitions have no failures to learn from. Collect "
                              "rollouts where the agent fails (more tasks, harder tasks), or raise "
                              "--failure-threshold")
    return pool


def sample_failures(pool: FailurePool, count: int, seed: str | int) -> tuple[Failure, ...]:
    """``count`` failures (all of them when the pool holds fewer), drawn without replacement with ``seed``."""
    if count < 1:
        raise ValueError(f"sample_failures: count must be at least 1, got {count}")
    chosen = random.Random(str(seed)).sample(range(len(pool.failures)), min(count, len(pool.failures)))
    return tuple(pool.failures[index] for index in chosen)


def _cut(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + " [...]"


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def _message_lines(message: dict[str, Any], final: bool) -> list[str]:
    role = str(message.get("role", "user"))
    lines = []
    text = _content(message).strip()
    if text or not message.get("tool_calls"):
        label = "agent's final reply" if final else role
        lines.append(f"{label}: {_cut(text) if text else '(empty)'}")
    for call in message.get("tool_calls") or ():
        function = (call.get("function") or {}) if isinstance(call, dict) else {}
        lines.append(f"{role} calls tool {function.get('name', '?')}({_cut(str(function.get('arguments', '')))})")
    return lines


def render_failures(failures: tuple[Failure, ...]) -> str:
    """The failures as plain text for the optimizer: each conversation without its system message (the
    prompt under revision is shown on its own), the agent's final reply, and the reward."""
    blocks = []
    for number, failure in enumerate(failures, 1):
        lines = [f"## Failed run {number} (task {failure.task_id or 'unknown'}, reward {failure.reward:g})"]
        conversation = [m for m in failure.messages if m.get("role") not in ("system", "developer")]
        for message in conversation:
            lines += _message_lines(message, final=False)
        for index, message in enumerate(failure.response):
            lines += _message_lines(message, final=index == len(failure.response) - 1)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
