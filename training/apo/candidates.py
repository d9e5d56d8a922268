"""Candidate prompts: what APO records about each one, the checks an edit must pass, and the winner rule.

Every prompt the search considers is a :class:`Candidate` in the tree (``tree.json``): the seed, and
each edit with its parent, the critique that produced it, the failures that critique saw, the
optimizer tokens it cost, and then either its validation score (with its paired difference against
its parent and against the seed) or why it was rejected. Rejection kinds are fixed strings
(:data:`REJECTION_KINDS`), so runs can be compared by what went wrong.

The rules here are pure functions of evaluations: :func:`paired_difference` compares a candidate
with another prompt on their shared (task, sample) pairs, and :func:`choose_winner` picks the best
candidate whose paired 95% interval against the seed lies above 0, or none.

May import: tracelearn.training.eval_results (results and the paired comparison).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tracelearn.training.apo.templates import TemplateError, VariableMismatchError, check_variables_kept
from tracelearn.training.eval_results import Comparison, EvalResult, compare

__all__ = [
    "REJECTION_KINDS",
    "SEED_ID",
    "Candidate",
    "PairedDifference",
    "Rejection",
    "Score",
    "TokenUsage",
    "choose_winner",
    "paired_difference",
    "prompt_hash",
    "validate_edit",
]

SEED_ID = "seed"
# evaluated: scored; failed: scored, but its agent run failed (every rollout a failure); rejected: not
# evaluated (see ``rejection``); unevaluated: the rollout budget ran out before its evaluation.
CandidateStatus = Literal["evaluated", "failed", "rejected", "unevaluated"]
REJECTION_KINDS = (
    "optimizer_error",  # the optimizer endpoint failed the call (after the client's retries)
    "empty_critique",  # the critique came back empty
    "empty_edit",  # the edit's <prompt> block is empty
    "malformed_edit",  # no <prompt>...</prompt> block, or one never closed
    "unbalanced_braces",  # the edit's braces are not template syntax
    "variables_changed",  # the edit dropped or invented template variables
    "unchanged",  # the edit is the parent prompt again
    "duplicate",  # the edit is a prompt the tree already holds
)


def prompt_hash(text: str) -> str:
    """SHA-256 of the prompt's UTF-8 text: its identity in the cache and the tree."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenUsage:
    """Optimizer tokens as its endpoint reported them (``usage``); calls without ``usage`` are counted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    calls_without_usage: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens,
                          self.calls + other.calls, self.calls_without_usage + other.calls_without_usage)

    def __sub__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(self.prompt_tokens - other.prompt_tokens, self.completion_tokens - other.completion_tokens,
                          self.calls - other.calls, self.calls_without_usage - other.calls_without_usage)

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total, "calls": self.calls, "calls_without_usage": self.calls_without_usage}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenUsage:
        return cls(int(data["prompt_tokens"]), int(data["completion_tokens"]), int(data["calls"]),
                   int(data["calls_without_usage"]))

    @classmethod
    def of_all(cls, usages: Iterable[TokenUsage]) -> TokenUsage:
        total = cls()
        for usage in usages:
            total += usage
        return total


@dataclass(frozen=True)
class Rejection:
    """Why an edit was not evaluated: one of :data:`REJECTION_KINDS` and a message a person can act on."""

    kind: str
    message: str

    def __post_init__(self) -> None:
        if self.kind not in REJECTION_KINDS:
            raise ValueError(f"unknown rejection kind {self.kind!r}; known: {', '.join(REJECTION_KINDS)}")


@dataclass(frozen=True)
class Score:
    """A validation score: successes of ``n`` rollouts, the Wilson 95% interval, and what it cost.

    ``rollouts_run`` is 0 when every rollout came from the cache; ``agent_error`` says why the agent
    failed, when it did (its rollouts are then failures).
    """

    n: int
    successes: int
    interval: tuple[float, float]
    rollouts_run: int
    agent_error: str | None = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @classmethod
    def of(cls, result: EvalResult, rollouts_run: int, agent_error: str | None = None) -> Score:
        return cls(result.n, result.successes, result.interval, rollouts_run, agent_error)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "successes": self.successes, "success_rate": self.success_rate,
                "interval_95": list(self.interval), "rollouts_run": self.rollouts_run,
                "agent_error": self.agent_error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Score:
        low, high = data["interval_95"]
        return cls(int(data["n"]), int(data["successes"]), (float(low), float(high)), int(data["rollouts_run"]),
                   data.get("agent_error"))


@dataclass(frozen=True)
class PairedDifference:
    """Success-rate difference of a candidate minus another on their shared (task, sample) pairs."""

    against: str
    pairs: int
    difference: float
    interval: tuple[float, float]

    @property
    def significant(self) -> bool:
        """The paired 95% interval lies above 0: better beyond noise."""
        return self.pairs > 0 and self.interval[0] > 0.0

    @classmethod
    def of(cls, comparison: Comparison, against: str) -> PairedDifference:
        return cls(against, comparison.pairs, comparison.difference, comparison.interval)

    def to_dict(self) -> dict[str, Any]:
        return {"against": self.against, "pairs": self.pairs, "difference": self.difference,
                "interval_95": list(self.interval), "significant": self.significant}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairedDifference:
        low, high = data["interval_95"]
        return cls(str(data["against"]), int(data["pairs"]), float(data["difference"]), (float(low), float(high)))


@dataclass(frozen=True)
class Candidate:
    """One node of the search tree (see the module docstring). ``round`` 0 is the seed."""

    id: str
    round: int
    parent: str | None
    prompt: str | None  # None when the optimizer's reply held no usable prompt
    status: CandidateStatus
    critique: str | None = None
    failures: tuple[str, ...] = ()  # rollout ids the critique saw
    tokens: TokenUsage = field(default_factory=TokenUsage)
    rejection: Rejection | None = None
    score: Score | None = None
    vs_parent: PairedDifference | None = None
    vs_seed: PairedDifference | None = None
    evaluated_as: str | None = None  # the prompt version the gateway substituted (APO's own registry)

    @property
    def prompt_hash(self) -> str | None:
        return None if self.prompt is None else prompt_hash(self.prompt)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "round": self.round,
            "parent": self.parent,
            "status": self.status,
            "prompt": self.prompt,
            "prompt_hash": self.prompt_hash,
            "critique": self.critique,
            "failures": list(self.failures),
            "tokens": self.tokens.to_dict(),
            "rejection": None if self.rejection is None else {"kind": self.rejection.kind,
                                                              "message": self.rejection.message},
            "score": None if self.score is None else self.score.to_dict(),
            "vs_parent": None if self.vs_parent is None else self.vs_parent.to_dict(),
            "vs_seed": None if self.vs_seed is None else self.vs_seed.to_dict(),
            "evaluated_as": self.evaluated_as,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        rejection = data.get("rejection")
        return cls(
            id=str(data["id"]),
            round=int(data["round"]),
            parent=data.get("parent"),
            prompt=data.get("prompt"),
            status=data["status"],
            critique=data.get("critique"),
            failures=tuple(data.get("failures") or ()),
            tokens=TokenUsage.from_dict(data["tokens"]),
            rejection=None if rejection is None else Rejection(str(rejection["kind"]), str(rejection["message"])),
            score=None if data.get("score") is None else Score.from_dict(data["score"]),
            vs_parent=None if data.get("vs_parent") is None else PairedDifference.from_dict(data["vs_parent"]),
            vs_seed=None if data.get("vs_seed") is None else PairedDifference.from_dict(data["vs_seed"]),
            evaluated_as=data.get("evaluated_as"),
        )


def validate_edit(parent: str, variables: frozenset[str], edited: str) -> Rejection | None:
    """Why ``edited`` may not replace ``parent`` (its braces, its variables, no change), or ``None``."""
    try:
        check_variables_kept(variables, edited)
    except VariableMismatchError as error:
        return Rejection("variables_changed", str(error))
    except TemplateError as error:
        return Rejection("unbalanced_braces", str(error))
    if edited.strip() == parent.strip():
        return Rejection("unchanged", "the edit is the parent prompt again")
    return None


def paired_difference(candidate: EvalResult, other: EvalResult, against: str) -> PairedDifference:
    """``candidate`` minus ``other`` on their paired rollouts (see :attr:`PairedDifference.significant`)."""
    return PairedDifference.of(compare(candidate, other), against)


def choose_winner(candidates: Iterable[Candidate]) -> Candidate | None:
    """The best evaluated candidate whose paired interval against the seed lies above 0, or ``None``
    (the seed prompt stands). Best: the highest success rate, then the highest lower bound of the
    difference, then the earliest found."""
    eligible = [c for c in candidates if c.score is not None and c.vs_seed is not None and c.vs_seed.significant]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (c.score.success_rate if c.score else 0.0,
                                                  c.vs_seed.interval[0] if c.vs_seed else 0.0))
