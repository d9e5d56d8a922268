"""What an evaluation found and what two evaluations say together: results, statistics, reports.

:class:`EvalResult` holds one model version's scored rollouts, a row per expected ``(task_id,
sample)``; the success rate's 95% interval is Wilson's score interval (:func:`wilson_interval`).
:func:`compare` pairs two evaluations' rollouts by ``(task_id, sample)`` and gives the difference of
success rates with Newcombe's paired score interval. :func:`results_table` renders them side by side,
:func:`write_evaluations` writes ``eval.json`` and ``eval_rollouts.parquet``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from rich.table import Table

from tracelearn.training.eval_inputs import EvalSpec

__all__ = [
    "MISSING_STATUS",
    "ROLLOUT_SCHEMA",
    "Comparison",
    "EvalResult",
    "compare",
    "paired_difference_interval",
    "results_table",
    "wilson_interval",
    "write_evaluations",
]

Z_95 = 1.959963984540054
ROLLOUT_SCHEMA = pl.Schema({
    "task_id": pl.String,
    "sample": pl.Int64,
    "rollout_id": pl.String,
    "status": pl.String,
    "reward": pl.Float64,
    "success": pl.Boolean,
})
MISSING_STATUS = "missing"  # the agent left no rollout for this (task, sample)


@dataclass(frozen=True, eq=False)
class EvalResult:
    """One model version's evaluation: a row per expected ``(task_id, sample)`` and what they add up to.

    ``model`` is the reference as given; ``registry_version`` the registry version it was pinned to
    (``calc-policy@3``, or ``None`` for a path or an external server); ``served_model`` the name the
    agent requested and ``model_version`` the version the server reported (``None`` when its
    ``/v1/models`` card has none, as vLLM's); ``agent_command`` the command as run (placeholders
    filled, without the ``opentelemetry-instrument`` prefix). ``rollouts`` columns: ``task_id``, ``sample``,
    ``rollout_id`` (null when the agent left none), ``status`` (the rollout's ``ok`` / ``error`` /
    ``incomplete``, or ``missing``), ``reward`` (the primary reward, null when none), ``success``.
    ``unmatched_rollouts`` counts captured rollouts that are no expected pair (an unknown task id, a
    sample out of range, or a second rollout of one pair); they are not scored.
    """

    model: str
    registry_version: str | None
    served_model: str
    model_version: str | None
    base_url: str
    spec: EvalSpec
    agent_command: tuple[str, ...]
    tasks: int
    rollouts: pl.DataFrame
    unmatched_rollouts: int
    pipeline_config_hash: str
    data_dir: Path
    wall_time_s: float

    @property
    def n(self) -> int:
        return self.rollouts.height

    @property
    def successes(self) -> int:
        return int(self.rollouts["success"].sum())

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson 95% interval of the success rate."""
        return wilson_interval(self.successes, self.n)

    @property
    def mean_reward(self) -> float | None:
        """Mean primary reward over the rollouts that have one (``None`` when none has)."""
        mean = self.rollouts["reward"].drop_nulls().mean()
        return float(mean) if isinstance(mean, int | float) else None

    @property
    def missing_rewards(self) -> int:
        """Rollouts the agent ran that got no reward (counted as failures)."""
        rollouts = self.rollouts
        return rollouts.filter(pl.col("reward").is_null() & (pl.col("status") != MISSING_STATUS)).height

    @property
    def missing_rollouts(self) -> int:
        """Expected ``(task_id, sample)`` pairs the agent left no rollout for (counted as failures)."""
        return self.rollouts.filter(pl.col("status") == MISSING_STATUS).height

    @property
    def agent_errors(self) -> int:
        """Rollouts with an error span (a failed model call, a tool that raised)."""
        return self.rollouts.filter(pl.col("status") == "error").height

    @property
    def label(self) -> str:
        """How reports name this version: the registry version it was pinned to, else the model as given."""
        return self.registry_version or self.model

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "model": self.model,
            "registry_version": self.registry_version,
            "served_model": self.served_model,
            "model_version": self.model_version,
            "base_url": self.base_url,
            "spec": self.spec.to_dict(),
            "agent_command": list(self.agent_command),
            "tasks": self.tasks,
            "n": self.n,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "interval_95": [low, high],
            "mean_reward": self.mean_reward,
            "missing_rewards": self.missing_rewards,
            "missing_rollouts": self.missing_rollouts,
            "agent_errors": self.agent_errors,
            "unmatched_rollouts": self.unmatched_rollouts,
            "pipeline_config_hash": self.pipeline_config_hash,
            "data_dir": str(self.data_dir),
            "wall_time_s": round(self.wall_time_s, 3),
        }



# --- Statistics -------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion: ``(center - half, center + half)`` with

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n),   p = successes / n.

    Unlike the normal approximation it stays inside [0, 1] and is not a point at 0 or n successes.
    ``n == 0`` gives ``(0.0, 1.0)``: nothing is known.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two evaluations on the same tasks and seeds, paired by ``(task_id, sample)``.

    ``both`` / ``only_a`` / ``only_b`` / ``neither`` count the pairs by which side succeeded;
    ``difference`` is ``a``'s success rate minus ``b``'s over the ``pairs`` and ``interval`` its 95%
    interval (Newcombe's method 10, see :func:`compare`). ``unpaired_a`` / ``unpaired_b`` count the
    rollouts of each side whose pair the other side lacks (different tasks files or limits).
    """

    a: EvalResult
    b: EvalResult
    pairs: int
    both: int
    only_a: int
    only_b: int
    neither: int
    unpaired_a: int
    unpaired_b: int
    difference: float
    interval: tuple[float, float]

    @property
    def a_rate(self) -> float:
        return (self.both + self.only_a) / self.pairs if self.pairs else 0.0

    @property
    def b_rate(self) -> float:
        return (self.both + self.only_b) / self.pairs if self.pairs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.label,
            "b": self.b.label,
            "pairs": self.pairs,
            "both": self.both,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "neither": self.neither,
            "unpaired_a": self.unpaired_a,
            "unpaired_b": self.unpaired_b,
            "a_success_rate": self.a_rate,
            "b_success_rate": self.b_rate,
            "difference": self.difference,
            "interval_95": list(self.interval),
        }


def compare(a: EvalResult, b: EvalResult, z: float = Z_95) -> Comparison:
    """``a`` against ``b``, rollout by rollout: the difference of success rates on shared pairs.

    The interval is Newcombe's (1998) method 10 for paired proportions: with Wilson intervals
    ``(l1, u1)`` of ``a``'s rate ``p1`` and ``(l2, u2)`` of ``b``'s rate ``p2`` over the pairs, and
    ``phi`` the correlation of the 2x2 table (0 when a margin is empty),

        lower = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        upper = d + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2),   d = p1 - p2.

    Chosen over the normal approximation on per-pair differences, which collapses to a point when
    every discordant pair goes one way (5 of 5 pairs won would be "[+100, +100]"). Raises ``ValueError``
    when the two evaluations used different seeds or success thresholds: their pairs would not be
    the same draws, or their successes not the same event.
    """
    for name in ("seed", "success_threshold"):
        if getattr(a.spec, name) != getattr(b.spec, name):
            raise ValueError(
                f"cannot compare {a.label} and {b.label}: they were evaluated with {name} "
                f"{getattr(a.spec, name)} and {getattr(b.spec, name)}; evaluate both with the same spec"
            )
    keys = ["task_id", "sample"]
    paired = a.rollouts.select(*keys, pl.col("success").alias("a")).join(
        b.rollouts.select(*keys, pl.col("success").alias("b")), on=keys, how="inner"
    )
    pairs = paired.height
    both = paired.filter(pl.col("a") & pl.col("b")).height
    only_a = paired.filter(pl.col("a") & ~pl.col("b")).height
    only_b = paired.filter(~pl.col("a") & pl.col("b")).height
    neither = pairs - both - only_a - only_b
    return Comparison(
        a=a,
        b=b,
        pairs=pairs,
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=neither,
        unpaired_a=a.n - pairs,
        unpaired_b=b.n - pairs,
        difference=(only_a - only_b) / pairs if pairs else 0.0,
        interval=paired_difference_interval(both, only_a, only_b, neither, z),
    )


def paired_difference_interval(both: int, only_a: int, only_b: int, neither: int,
                               z: float = Z_95) -> tuple[float, float]:
    """Newcombe's method-10 interval for ``p_a - p_b`` from a paired 2x2 table (see :func:`compare`)."""
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, d - below), min(1.0, d + above)



# --- Rendering --------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def results_table(results: Sequence[EvalResult], comparison: Comparison | None = None) -> Table:
    """Versions side by side: n, success rate [95% interval], mean reward, and the failures by cause
    (rollouts without a reward, pairs without a rollout, rollouts with an error); with a comparison, a
    last row with its paired difference in percentage points and its discordant pairs."""
    table = Table(title="evaluation", title_justify="left", caption_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("version", overflow="fold")
    table.add_column("n", justify="right")
    table.add_column("success [95% CI]", justify="right", no_wrap=True)
    for column in ("mean reward", "no reward", "missing", "errors"):
        table.add_column(column, justify="right")
    for result in results:
        low, high = result.interval
        mean = result.mean_reward
        table.add_row(
            result.label,
            result.model_version or "-",
            str(result.n),
            f"{_percent(result.success_rate)} [{_percent(low)}, {_percent(high)}]",
            "-" if mean is None else f"{mean:.3f}",
            str(result.missing_rewards),
            str(result.missing_rollouts),
            str(result.agent_errors),
        )
    if comparison is not None:
        low, high = comparison.interval
        table.add_section()
        table.add_row("difference", f"{comparison.a.label} - {comparison.b.label}", str(comparison.pairs),
                      f"{_points(comparison.difference)} pts [{_points(low)}, {_points(high)}]")
        table.caption = (f"paired by (task, sample): only {comparison.a.label} succeeded on {comparison.only_a}, "
                         f"only {comparison.b.label} on {comparison.only_b}, both on {comparison.both}, "
                         f"neither on {comparison.neither}; 95% CI by Newcombe's paired score method")
    return table


def write_evaluations(out: Path, results: Sequence[EvalResult], comparison: Comparison | None = None) -> Path:
    """Write ``out/eval.json`` (``{"evaluations": [...], "comparison": {...} | null}``) and
    ``out/eval_rollouts.parquet`` (every result's rollouts with a ``model`` column); return the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "evaluations": [result.to_dict() for result in results],
        "comparison": comparison.to_dict() if comparison is not None else None,
    }
    path = out / "eval.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    frames = [result.rollouts.with_columns(pl.lit(result.label).alias("model")) for result in results]
    pl.concat(frames).select("model", *ROLLOUT_SCHEMA.names()).write_parquet(out / "eval_rollouts.parquet")
    return path

