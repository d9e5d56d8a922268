"""Held-out evaluations of the loop's versions, kept per version so none is run twice.

Every round compares its candidate with production on the same tasks and draws; the production of
round ``r`` was the candidate of an earlier round (or the starting policy), already measured with the
same :class:`~tracelearn.training.evaluate.EvalSpec`. :class:`VersionEvaluations` keeps each version's
evaluation under ``<dir>/<name>@<n>/`` (``result.json``, ``rollouts.parquet`` and the evaluation's own
folder) and reads it back instead of serving the version again; one made with other settings, or
left half-done by an interruption, is made again.

Besides success, each evaluation says how the agent went about it (:func:`behaviour`): the share of
rollouts that called a tool and the mean LLM calls per rollout, from the pipeline's rollouts table.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console

from tracelearn.registry import Registry
from tracelearn.training.eval_inputs import EvalSpec
from tracelearn.training.eval_results import ROLLOUT_SCHEMA, EvalResult, wilson_interval
from tracelearn.training.evaluate import evaluate_model

__all__ = ["Behaviour", "VersionEvaluations", "behaviour"]


@dataclass(frozen=True)
class Behaviour:
    """Success, tool use and turns over one evaluation's expected rollouts (missing ones count as
    failures without tool calls), each rate with its Wilson 95% interval."""

    n: int
    successes: int
    tool_users: int
    mean_llm_calls: float

    @property
    def success_rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @property
    def tool_call_rate(self) -> float:
        return self.tool_users / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "success_rate": self.success_rate,
                "success_interval_95": list(wilson_interval(self.successes, self.n)),
                "tool_call_rate": self.tool_call_rate,
                "tool_call_interval_95": list(wilson_interval(self.tool_users, self.n)),
                "mean_llm_calls": self.mean_llm_calls}


def behaviour(result: EvalResult) -> Behaviour:
    """Success, tool-call share and mean LLM calls of ``result``'s rollouts (reads its ``data/rollouts``)."""
    files = sorted((result.data_dir / "rollouts").rglob("*.parquet"))
    counts = (pl.read_parquet(files).select("rollout_id", "n_tool_calls", "n_llm_calls") if files
              else pl.DataFrame(schema={"rollout_id": pl.String, "n_tool_calls": pl.Int64, "n_llm_calls": pl.Int64}))
    joined = result.rollouts.join(counts, on="rollout_id", how="left").with_columns(
        pl.col("n_tool_calls").fill_null(0), pl.col("n_llm_calls").fill_null(0))
    mean_calls = joined["n_llm_calls"].mean()
    return Behaviour(n=joined.height, successes=int(joined["success"].sum()),
                     tool_users=int((joined["n_tool_calls"] > 0).sum()),
                     mean_llm_calls=float(mean_calls) if isinstance(mean_calls, int | float) else 0.0)


def _folder(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]+", "-", ref)


class VersionEvaluations:
    """Each registry version's held-out evaluation under ``root``, made once with ``spec``."""

    def __init__(self, root: Path, spec: EvalSpec, registry: Registry, console: Console) -> None:
        self.root, self.spec, self.registry, self.console = root, spec, registry, console

    def path(self, ref: str) -> Path:
        return self.root / _folder(ref)

    def result(self, ref: str) -> EvalResult:
        """The evaluation of registry version ``ref`` (``calc-policy@3``): read back, or made now."""
        folder = self.path(ref)
        kept = self._read(folder)
        if kept is not None:
            return kept
        if folder.exists():
            shutil.rmtree(folder)
        result = evaluate_model(f"registry:{ref}", self.spec, folder / "run", registry=str(self.registry.location),
                                console=self.console)
        result.rollouts.write_parquet(folder / "rollouts.parquet")
        document = {"result": result.to_dict(), "behaviour": behaviour(result).to_dict()}
        (folder / "result.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        return result

    def behaviour(self, ref: str) -> dict[str, Any] | None:
        """The stored behaviour of ``ref``'s evaluation, or None when it has none."""
        path = self.path(ref) / "result.json"
        return json.loads(path.read_text(encoding="utf-8"))["behaviour"] if path.exists() else None

    def _read(self, folder: Path) -> EvalResult | None:
        """The kept evaluation in ``folder``, when it is complete and was made with this spec."""
        try:
            document = json.loads((folder / "result.json").read_text(encoding="utf-8"))["result"]
            rollouts = pl.read_parquet(folder / "rollouts.parquet").cast(ROLLOUT_SCHEMA)
        except (OSError, ValueError, KeyError, pl.exceptions.PolarsError):
            return None
        if document["spec"] != self.spec.to_dict():
            return None
        return EvalResult(
            model=document["model"], registry_version=document["registry_version"],
            served_model=document["served_model"], model_version=document["model_version"],
            base_url=document["base_url"], spec=self.spec, agent_command=tuple(document["agent_command"]),
            tasks=document["tasks"], rollouts=rollouts, unmatched_rollouts=document["unmatched_rollouts"],
            pipeline_config_hash=document["pipeline_config_hash"], data_dir=Path(document["data_dir"]),
            wall_time_s=document["wall_time_s"],
        )
