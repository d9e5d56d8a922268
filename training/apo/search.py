"""The beam search over prompts: rounds of critique-and-edit proposals, scored by rollouts, kept by a paired test.

Round 0 evaluates the seed prompt. Each later round, for every prompt in the beam, asks the optimizer
for ``branch`` edits, each from its own seeded sample of failures (``failures_per_critique`` of them,
drawn with the key ``seed:round:parent:branch``). An edit is checked (template variables kept, braces
balanced, not the parent again, not a prompt the tree already holds) and evaluated on the same tasks,
samples and seed as every other candidate, and compared, pair by pair, with its parent and with the
seed. The ``beam`` best prompts by success rate among the beam and the round's evaluated edits go on
to the next round (a tie keeps the older prompt), as in ProTeGi: exploring needs no proof. Declaring
a winner does: it is the best candidate whose paired 95% interval against the seed lies above 0
(``candidates.choose_winner``); without one, the seed prompt stands.

Budgets stop the search cleanly: before a proposal when the optimizer tokens reached
``max_optimizer_tokens``, and before an evaluation that would take the rollouts past ``max_rollouts``
(that candidate stays in the tree, ``unevaluated``). A seed that succeeds on every validation rollout
stops the search at once: no candidate could beat it on these tasks.

Each completed round is written (``rounds/round-N.json``) with its candidates, the beam after it and its
costs; the tree after every candidate. A search started on a run directory holding completed rounds
continues after the last one; the results it needs of earlier candidates come from the evaluation cache.

The search sees its optimizer and its evaluator through two small interfaces (:class:`EditProposer`,
:class:`CandidateEvaluator`), so it runs the same against the real ones and against test doubles.

May import: tracelearn.training.apo, tracelearn.training.eval_results, rich.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from tracelearn.training.apo.candidates import (
    SEED_ID,
    Candidate,
    PairedDifference,
    Rejection,
    Score,
    TokenUsage,
    choose_winner,
    paired_difference,
    prompt_hash,
    validate_edit,
)
from tracelearn.training.apo.evaluation import CandidateEvaluation
from tracelearn.training.apo.failures import Failure, FailurePool, sample_failures
from tracelearn.training.apo.optimizer import Proposal
from tracelearn.training.apo.run_files import RunFiles, write_json_atomically
from tracelearn.training.apo.templates import template_variables
from tracelearn.training.eval_results import EvalResult

__all__ = [
    "CandidateEvaluator",
    "EditProposer",
    "RoundRecord",
    "SearchOutcome",
    "SearchSettings",
    "SeedEvaluationError",
    "Stop",
    "beam_search",
    "round_notes",
    "round_table",
]


@dataclass(frozen=True)
class Stop:
    """Why the search ended before its last round: ``kind`` is ``tokens``, ``rollouts`` or ``perfect_seed``."""

    kind: str
    reason: str


class SeedEvaluationError(RuntimeError):
    """The agent failed on the seed prompt: with no baseline, no candidate can be measured."""


class EditProposer(Protocol):
    """Proposes one edit of ``prompt`` from ``failures`` (``optimizer.OptimizerModel`` is one)."""

    def propose(self, prompt: str, variables: frozenset[str], failures: tuple[Failure, ...], threshold: float,
                seed: int, attributes: Mapping[str, str]) -> Proposal: ...


class CandidateEvaluator(Protocol):
    """Scores prompts on the validation tasks (``evaluation.PromptEvaluator`` is one)."""

    def rollouts_needed(self, prompt: str) -> int: ...

    def evaluate(self, candidate_id: str, prompt: str) -> CandidateEvaluation: ...


@dataclass(frozen=True)
class SearchSettings:
    """The search's shape and budgets (``None``: no budget). See the module docstring."""

    rounds: int = 3
    beam: int = 4
    branch: int = 4
    failures_per_critique: int = 4
    seed: int = 0
    max_optimizer_tokens: int | None = None
    max_rollouts: int | None = None

    def __post_init__(self) -> None:
        for name in ("rounds", "beam", "branch", "failures_per_critique", "max_optimizer_tokens", "max_rollouts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {value}")

    def resume_key(self) -> dict[str, Any]:
        """What a resumed search must share with the search it continues (rounds and budgets may change)."""
        return {"beam": self.beam, "branch": self.branch, "failures_per_critique": self.failures_per_critique,
                "seed": self.seed}


@dataclass(frozen=True)
class RoundRecord:
    """One completed round: the candidates it created, the beam after it, and what it cost."""

    number: int
    candidates: tuple[Candidate, ...]
    beam: tuple[str, ...]
    tokens: TokenUsage
    rollouts_run: int
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.number, "complete": True, "candidates": [c.to_dict() for c in self.candidates],
                "beam": list(self.beam), "tokens": self.tokens.to_dict(), "rollouts_run": self.rollouts_run,
                "wall_time_s": round(self.wall_time_s, 3)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        return cls(int(data["round"]), tuple(Candidate.from_dict(c) for c in data["candidates"]),
                   tuple(data["beam"]), TokenUsage.from_dict(data["tokens"]), int(data["rollouts_run"]),
                   float(data["wall_time_s"]))


@dataclass(frozen=True)
class SearchOutcome:
    """What the search found and what it cost. ``stop`` is ``rounds``, ``tokens``, ``rollouts`` or
    ``perfect_seed``; ``results`` holds the evaluations of this process (by candidate id)."""

    seed: Candidate
    candidates: tuple[Candidate, ...]
    rounds: tuple[RoundRecord, ...]
    beam: tuple[str, ...]
    winner: Candidate | None
    stop: str
    stop_reason: str
    tokens: TokenUsage
    rollouts_run: int
    results: Mapping[str, EvalResult]

    @property
    def rounds_completed(self) -> int:
        """Rounds of edits completed (round 0, the seed's evaluation, is not one)."""
        return len(self.rounds) - 1


def _request_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def _percent(value: float) -> str:
    return f"{100 * value:.0f}"


def _success(score: Score | None) -> str:
    if score is None:
        return "-"
    low, high = score.interval
    return f"{_percent(score.success_rate)}% [{_percent(low)}, {_percent(high)}]"


def _difference(paired: PairedDifference | None) -> str:
    if paired is None:
        return "-"
    low, high = paired.interval
    return f"{100 * paired.difference:+.0f} [{100 * low:+.0f}, {100 * high:+.0f}]"


def _note(candidate: Candidate) -> str:
    if candidate.rejection is not None:
        return f"rejected ({candidate.rejection.kind}): {candidate.rejection.message}"
    if candidate.status == "unevaluated":
        return "not evaluated: the rollout budget ran out"
    if candidate.score is not None and candidate.score.agent_error:
        return f"agent failed: {candidate.score.agent_error}"
    if candidate.vs_seed is not None and candidate.vs_seed.significant:
        return "beats the seed beyond noise"
    return ""


def round_table(number: int, candidates: list[Candidate]) -> Table:
    """The candidates of one round: success rate and paired differences, compact on purpose (points
    without decimals; tokens are in the round's line and the tree) so that it reads on 80 columns.
    What the numbers do not say is in :func:`round_notes`."""
    table = Table(title=f"round {number}", title_justify="left", caption_justify="left",
                  caption="success: % [95% CI]; vs: paired difference, points [95% CI]")
    for column in ("id", "parent"):
        table.add_column(column, no_wrap=True)
    for column in ("success", "vs parent", "vs seed"):
        table.add_column(column, justify="right", no_wrap=True)
    for candidate in candidates:
        table.add_row(candidate.id, candidate.parent or "-", _success(candidate.score),
                      _difference(candidate.vs_parent), _difference(candidate.vs_seed))
    return table


def round_notes(candidates: list[Candidate]) -> list[str]:
    """One line per candidate with something to say: rejected, failed, unevaluated, or a winner."""
    return [f"{candidate.id}: {note}" for candidate in candidates if (note := _note(candidate))]


class _BeamSearch:
    """The state of one search while it runs (see :func:`beam_search`)."""

    def __init__(self, seed_prompt: str, proposer: EditProposer, evaluator: CandidateEvaluator, pool: FailurePool,
                 settings: SearchSettings, files: RunFiles, console: Console) -> None:
        self.seed_prompt = seed_prompt
        self.variables = template_variables(seed_prompt, "the seed prompt")
        self.proposer = proposer
        self.evaluator = evaluator
        self.pool = pool
        self.settings = settings
        self.files = files
        self.console = console
        self.candidates: dict[str, Candidate] = {}
        self.results: dict[str, EvalResult] = {}
        self.rounds: list[RoundRecord] = []
        self.beam: list[str] = []
        self.tokens = TokenUsage()
        self.rollouts_run = 0

    # -- state ---------------------------------------------------------------------------------------

    def resume(self) -> None:
        for document in self.files.completed_rounds():
            record = RoundRecord.from_dict(document)
            self.rounds.append(record)
            self.candidates.update((c.id, c) for c in record.candidates)
            self.beam = list(record.beam)
            self.tokens += record.tokens
            self.rollouts_run += record.rollouts_run
        if self.rounds:
            self.console.print(f"resuming {self.files.out}: {len(self.rounds) - 1} round(s) of edits done, "
                               f"{self.rollouts_run} rollouts and {self.tokens.total} optimizer tokens spent; beam: "
                               f"{', '.join(self.beam)}")

    def write_tree(self) -> None:
        write_json_atomically(self.files.tree, {
            "seed": SEED_ID,
            "beam": self.beam,
            "rounds_completed": max(0, len(self.rounds) - 1),
            "candidates": [candidate.to_dict() for candidate in self.candidates.values()],
        })

    def result_of(self, candidate: Candidate) -> EvalResult:
        """The candidate's evaluation: from this process, else from the cache (a resumed run)."""
        if candidate.id not in self.results:
            assert candidate.prompt is not None, "only evaluated candidates are compared"
            evaluation = self.evaluator.evaluate(candidate.id, candidate.prompt)
            self.rollouts_run += evaluation.rollouts_run
            self.results[candidate.id] = evaluation.result
        return self.results[candidate.id]

    # -- round 0 -------------------------------------------------------------------------------------

    def evaluate_seed(self) -> None:
        """Round 0: the baseline every candidate is compared with."""
        self.console.rule("round 0: the seed prompt")
        started = time.monotonic()
        evaluation = self.evaluator.evaluate(SEED_ID, self.seed_prompt)
        if evaluation.agent_error is not None:
            raise SeedEvaluationError(f"the agent failed on the seed prompt, so no candidate can be measured "
                                      f"against it; fix the agent command first: {evaluation.agent_error}")
        self.rollouts_run += evaluation.rollouts_run
        self.results[SEED_ID] = evaluation.result
        seed = Candidate(SEED_ID, 0, None, self.seed_prompt, "evaluated",
                         score=Score.of(evaluation.result, evaluation.rollouts_run),
                         evaluated_as=evaluation.evaluated_as)
        self.candidates[SEED_ID] = seed
        self.beam = [SEED_ID]
        self.complete_round(0, [seed], started, TokenUsage(), evaluation.rollouts_run)

    def perfect_seed(self) -> Stop | None:
        score = self.candidates[SEED_ID].score
        if score is not None and score.successes == score.n:
            return Stop("perfect_seed", f"the seed prompt succeeds on all {score.n} validation rollouts: no "
                                        "candidate can beat it on these tasks (use harder or more tasks)")
        return None

    # -- rounds of edits -----------------------------------------------------------------------------

    def token_budget_spent(self, number: int) -> Stop | None:
        budget = self.settings.max_optimizer_tokens
        if budget is not None and self.tokens.total >= budget:
            return Stop("tokens", f"the optimizer token budget is spent ({self.tokens.total} of {budget} tokens) "
                                  f"in round {number}")
        return None

    def duplicate_of(self, prompt: str) -> Rejection | None:
        digest = prompt_hash(prompt)
        for candidate in self.candidates.values():
            if candidate.prompt_hash == digest and candidate.status in ("evaluated", "failed"):
                return Rejection("duplicate", f"the edit is {candidate.id}'s prompt again")
        return None

    def propose(self, number: int, parent: Candidate, branch: int, child_id: str) -> Candidate:
        """A child of ``parent``: proposed and checked, not yet evaluated (or rejected)."""
        key = f"{self.settings.seed}:{number}:{parent.id}:{branch}"
        failures = sample_failures(self.pool, self.settings.failures_per_critique, key)
        assert parent.prompt is not None, "the beam holds evaluated prompts only"
        self.console.print(f"{child_id}: asking the optimizer to edit {parent.id} from {len(failures)} failures ...",
                           highlight=False)
        proposal = self.proposer.propose(parent.prompt, self.variables, failures, self.pool.threshold,
                                         _request_seed(key), {"tracelearn.apo.candidate": child_id,
                                                              "tracelearn.apo.parent": parent.id,
                                                              "tracelearn.apo.round": str(number)})
        self.tokens += proposal.usage
        rejection = proposal.rejection
        if rejection is None and proposal.prompt is not None:
            rejection = validate_edit(parent.prompt, self.variables, proposal.prompt) or self.duplicate_of(
                proposal.prompt)
        return Candidate(child_id, number, parent.id, proposal.prompt, "rejected" if rejection else "unevaluated",
                         critique=proposal.critique, failures=proposal.failures, tokens=proposal.usage,
                         rejection=rejection)

    def evaluate_child(self, child: Candidate) -> Candidate:
        assert child.prompt is not None and child.parent is not None
        evaluation = self.evaluator.evaluate(child.id, child.prompt)
        self.rollouts_run += evaluation.rollouts_run
        self.results[child.id] = evaluation.result
        parent = self.candidates[child.parent]
        vs_parent = paired_difference(evaluation.result, self.result_of(parent), parent.id)
        seed = self.candidates[SEED_ID]
        vs_seed = vs_parent if parent.id == SEED_ID else paired_difference(evaluation.result, self.result_of(seed),
                                                                           SEED_ID)
        return dataclasses.replace(
            child, status="failed" if evaluation.agent_error else "evaluated",
            score=Score.of(evaluation.result, evaluation.rollouts_run, evaluation.agent_error),
            vs_parent=vs_parent, vs_seed=vs_seed, evaluated_as=evaluation.evaluated_as)

    def rollout_budget_exceeded(self, child: Candidate, number: int) -> Stop | None:
        budget = self.settings.max_rollouts
        if budget is None or child.prompt is None:
            return None
        needed = self.evaluator.rollouts_needed(child.prompt)
        if self.rollouts_run + needed > budget:
            return Stop("rollouts", f"the rollout budget would be exceeded in round {number}: {self.rollouts_run} "
                                    f"of {budget} rollouts run, and evaluating {child.id} takes {needed} more")
        return None

    def edit_round(self, number: int) -> Stop | None:
        """One round of edits; returns a stop reason when a budget ended it before it completed."""
        started, tokens_before, rollouts_before = time.monotonic(), self.tokens, self.rollouts_run
        self.console.rule(f"round {number}/{self.settings.rounds}: {len(self.beam)} prompt(s) in the beam x "
                          f"{self.settings.branch} edits")
        created: list[Candidate] = []
        for parent_id in list(self.beam):
            for branch in range(self.settings.branch):
                stop = self.token_budget_spent(number)
                if stop is not None:
                    return stop
                child = self.propose(number, self.candidates[parent_id], branch, f"r{number}.{len(created) + 1}")
                stop = self.rollout_budget_exceeded(child, number) if child.status == "unevaluated" else None
                if child.status == "unevaluated" and stop is None:
                    child = self.evaluate_child(child)
                self.candidates[child.id] = child
                created.append(child)
                self.write_tree()
                if stop is not None:
                    return stop
        self.beam = self.select_beam(created)
        self.complete_round(number, created, started, self.tokens - tokens_before,
                            self.rollouts_run - rollouts_before)
        return None

    def select_beam(self, created: list[Candidate]) -> list[str]:
        """The ``beam`` best by success rate of the beam and the round's scored edits; ``sorted`` is
        stable and the beam comes first, so a tie keeps the older prompt."""
        contenders = [self.candidates[i] for i in self.beam] + [c for c in created if c.status == "evaluated"]
        ranked = sorted(contenders, key=lambda c: -(c.score.success_rate if c.score else 0.0))
        return [c.id for c in ranked[: self.settings.beam]]

    def complete_round(self, number: int, created: list[Candidate], started: float, tokens: TokenUsage,
                       rollouts_run: int) -> None:
        record = RoundRecord(number, tuple(created), tuple(self.beam), tokens, rollouts_run,
                             time.monotonic() - started)
        self.files.write_round(number, record.to_dict())
        self.rounds.append(record)
        self.write_tree()
        self.console.print(round_table(number, created))
        for line in round_notes(created):
            self.console.print(line, highlight=False)
        self.console.print(f"round {number}: {tokens.total} optimizer tokens, {rollouts_run} rollouts; beam: "
                           f"{', '.join(self.beam)}", highlight=False)

    def run(self) -> SearchOutcome:
        self.resume()
        if not self.rounds:
            self.evaluate_seed()
        stop = self.perfect_seed()
        for number in range(len(self.rounds), self.settings.rounds + 1):
            if stop is not None:
                break
            stop = self.edit_round(number)
        self.write_tree()
        stop = stop or Stop("rounds", f"completed {len(self.rounds) - 1} round(s) of edits")
        return SearchOutcome(
            seed=self.candidates[SEED_ID], candidates=tuple(self.candidates.values()), rounds=tuple(self.rounds),
            beam=tuple(self.beam), winner=choose_winner(self.candidates.values()), stop=stop.kind,
            stop_reason=stop.reason, tokens=self.tokens, rollouts_run=self.rollouts_run, results=dict(self.results))


def beam_search(seed_prompt: str, proposer: EditProposer, evaluator: CandidateEvaluator, pool: FailurePool,
                settings: SearchSettings, files: RunFiles, console: Console | None = None) -> SearchOutcome:
    """Search for a better prompt than ``seed_prompt`` (see the module docstring); resumes from ``files``.

    Raises :class:`SeedEvaluationError` when the agent fails on the seed prompt, and ``TemplateError``
    when the seed's braces are not template syntax.
    """
    return _BeamSearch(seed_prompt, proposer, evaluator, pool, settings, files, console or Console(stderr=True)).run()
