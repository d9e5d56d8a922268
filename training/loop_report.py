"""What the loop did, round by round: a table and a plot from its workdir (nothing is recomputed).

Round 0 is the starting policy; row ``r`` holds round ``r``'s collection (success, tool-call share and
groups with a learning signal on the training tasks), its candidate's held-out evaluation, the gate's
outcome, and production after the round: held-out success with its Wilson 95% interval, the share of
rollouts that called the tool (with its interval) and the mean LLM calls (turns) per rollout.
``loop.png`` plots production's held-out success and tool-call rate per round (candidates as open
markers) and the mean turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from tracelearn.training.loop import RoundState

__all__ = ["RoundRow", "loop_rows", "loop_table", "plot_loop", "write_loop_report"]


@dataclass(frozen=True)
class RoundRow:
    """One round of the report (round 0: the starting policy)."""

    number: int
    outcome: str
    reason: str
    production: str | None
    production_eval: dict[str, Any] | None
    candidate: str | None
    candidate_eval: dict[str, Any] | None
    collection: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _behaviour(workdir: Path, ref: str | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    import re

    path = workdir / "evals" / re.sub(r"[^A-Za-z0-9@._-]+", "-", ref) / "result.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["behaviour"]  # type: ignore[no-any-return]


def loop_rows(workdir: Path) -> list[RoundRow]:
    """The rows of every round recorded under ``workdir`` (round 0 once the first round evaluated)."""
    states = [RoundState.load(workdir, int(path.name)) for path in sorted((workdir / "rounds").glob("[0-9][0-9]"))]
    rows: list[RoundRow] = []
    production: str | None = None
    for state in states:
        collected = state.steps.get("collect")
        if production is None and collected is not None:
            production = collected["production"]
            rows.append(RoundRow(0, "start", "the starting policy", production, _behaviour(workdir, production),
                                 None, None, None))
        candidate = state.steps.get("publish", {}).get("candidate")
        if state.outcome == "promoted":
            production = candidate
        rows.append(RoundRow(
            number=state.number, outcome=state.outcome or "running: " + next(
                (step for step in ("collect", "build", "train", "publish", "evaluate", "gate")
                 if step not in state.steps), "gate"),
            reason=state.reason or "", production=production, production_eval=_behaviour(workdir, production),
            candidate=candidate, candidate_eval=_behaviour(workdir, candidate), collection=state.steps.get("build"),
        ))
    return rows


def _rate(evaluation: dict[str, Any] | None, key: str) -> str:
    if evaluation is None:
        return "-"
    low, high = evaluation[f"{key}_interval_95"]
    return f"{100 * evaluation[f'{key}_rate']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def loop_table(rows: list[RoundRow]) -> Table:
    """Per round: collection, candidate, gate, and production's held-out success, tool calls, turns."""
    table = Table(title="the loop, round by round (held-out: same tasks and seeds every round; 95% intervals)",
                  title_justify="left")
    for column in ("round", "collected: success / tool calls / groups with signal", "candidate", "candidate success",
                   "gate", "production", "held-out success", "tool calls", "turns"):
        table.add_column(column, overflow="fold")
    for row in rows:
        collected = "-"
        if row.collection is not None:
            c = row.collection
            collected = (f"{100 * c['success_rate']:.0f}% / {100 * c['tool_call_rate']:.0f}% / "
                         f"{c['groups'] - c['zero_signal_groups']} of {c['groups']}")
        evaluation = row.production_eval
        table.add_row(str(row.number), collected, row.candidate or "-", _rate(row.candidate_eval, "success"),
                      row.outcome, row.production or "-", _rate(evaluation, "success"), _rate(evaluation, "tool_call"),
                      f"{evaluation['mean_llm_calls']:.2f}" if evaluation else "-")
    return table


def plot_loop(rows: list[RoundRow], path: Path) -> Path:
    """``path`` (PNG): production's held-out success and tool-call rate per round with 95% intervals,
    candidates as open markers; mean turns per rollout beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, turns) = plt.subplots(1, 2, figsize=(11, 4))
    evaluated = [row for row in rows if row.production_eval is not None]
    for key, color, label in (("success", "tab:green", "held-out success"), ("tool_call", "tab:blue", "tool calls")):
        xs = [row.number for row in evaluated]
        values = [row.production_eval[f"{key}_rate"] for row in evaluated]  # type: ignore[index]
        # Wilson bounds at 0 or n successes sit a rounding error past the rate: no negative bar lengths.
        lows = [max(0.0, v - row.production_eval[f"{key}_interval_95"][0])  # type: ignore[index]
                for v, row in zip(values, evaluated, strict=True)]
        highs = [max(0.0, row.production_eval[f"{key}_interval_95"][1] - v)  # type: ignore[index]
                 for v, row in zip(values, evaluated, strict=True)]
        rates.errorbar(xs, values, yerr=[lows, highs], marker="o", capsize=4, color=color, label=f"production: {label}")
        candidates = [row for row in rows if row.candidate_eval is not None]
        rates.scatter([row.number + 0.08 for row in candidates],
                      [row.candidate_eval[f"{key}_rate"] for row in candidates],  # type: ignore[index]
                      facecolors="none", edgecolors=color, label=f"candidate: {label}")
    rates.set_ylim(0, 1)
    rates.set_xlabel("round")
    rates.set_title("held-out, per round (95% CI)")
    rates.legend(fontsize=8, loc="lower right")
    rates.grid(alpha=0.3)
    turns.plot([row.number for row in evaluated], [row.production_eval["mean_llm_calls"] for row in evaluated],  # type: ignore[index]
               marker="o", color="tab:purple")
    turns.set_xlabel("round")
    turns.set_title("mean LLM calls (turns) per held-out rollout")
    turns.grid(alpha=0.3)
    for axis in (rates, turns):
        axis.set_xticks([row.number for row in rows])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_loop_report(workdir: Path) -> list[RoundRow]:
    """The rows of ``workdir``'s rounds, also written as ``loop_rounds.json`` and plotted in ``loop.png``."""
    rows = loop_rows(workdir)
    if rows:
        (workdir / "loop_rounds.json").write_text(json.dumps([row.to_dict() for row in rows], indent=2) + "\n",
                                                  encoding="utf-8")
        plot_loop(rows, workdir / "loop.png")
    return rows
