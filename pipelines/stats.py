"""Dataset analysis: what a transitions dataset (and a spans dataset) holds, as polars DataFrames.

``tracelearn transitions stats`` and ``tracelearn spans stats`` print these frames as tables and plot
them (``tracelearn.pipelines.plots``); from Python, :func:`transition_stats` and
:func:`span_analysis` return the same numbers. Every function here is pure: frames in, frames out.

Reward statistics use the sample standard deviation (``ddof=1``, as the GRPO advantages do); a
figure over fewer than two values is null. Token lengths are the lengths of the stored token ids,
null for a transition without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tracelearn.pipelines.advantages import grpo_advantages
from tracelearn.pipelines.prepared import ensure_prepared
from tracelearn.pipelines.rollout_rewards import rollout_rewards
from tracelearn.pipelines.rollouts import rollout_task_ids
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import DatasetError, dataset_files, require_current_version
from tracelearn.schemas.tables import TRANSITIONS

__all__ = [
    "ConfigHashError",
    "NoTransitionsError",
    "SpanAnalysis",
    "TransitionStats",
    "by_agent",
    "by_task",
    "choose_config_hash",
    "groups",
    "overview",
    "scan_transitions",
    "span_analysis",
    "span_by_agent",
    "span_by_task",
    "span_calls",
    "token_id_coverage",
    "transition_distributions",
    "transition_stats",
    "transitions_directory",
]

DEFAULT_GROUP_BY: tuple[str, ...] = ("task_id",)
# The transitions table as polars reads it (every file, whichever version, scans to these columns).
TRANSITIONS_FRAME_SCHEMA = pl.DataFrame(TRANSITIONS.schema.empty_table()).schema
_PROMPT_TOKENS = "prompt_tokens"
_RESPONSE_TOKENS = "response_tokens"


class ConfigHashError(DatasetError):
    """The dataset holds several pipeline config hashes and none was chosen, or the chosen prefix matches none."""


class NoTransitionsError(DatasetError):
    """A build output holds rollouts but no transitions (the build chose no LLM call)."""


def _no_transitions(root: Path) -> NoTransitionsError:
    """Say plainly that the build made rollouts only, with their counts and where to look."""
    rollouts = pl.scan_parquet(dataset_files(root / "rollouts")).select(
        pl.len().alias("rollouts"), pl.col("n_llm_calls").sum().alias("calls")
    )
    row = rollouts.collect().row(0, named=True)
    return NoTransitionsError(
        f"{root}: the build made {row['rollouts']} rollouts ({row['calls'] or 0} LLM calls in them) and no "
        "transitions. With 0 LLM calls no LLM instrumentation saw the agent's calls (see `tracelearn spans "
        "stats`); otherwise every call was left out by select: in pipeline.yaml"
    )


def transitions_directory(root: str | Path) -> Path:
    """The transitions table's directory: ``root/transitions`` when ``root`` is a build output root, else ``root``."""
    path = Path(root)
    return path / "transitions" if (path / "transitions").is_dir() else path


def _check_versions(files: list[Path]) -> None:
    """Refuse, naming the file, a transitions file the lazy scan cannot read as the current schema."""
    for file in files:
        require_current_version(file, TRANSITIONS, "rebuild the partition with `tracelearn transitions build`")


def choose_config_hash(hashes: list[str], prefix: str | None) -> str:
    """The one config hash of ``hashes`` starting with ``prefix`` (any, when the dataset holds only one).

    Raises :class:`ConfigHashError` listing the hashes when several exist and ``prefix`` is None,
    or when ``prefix`` matches none or several of them.
    """
    listed = ", ".join(hashes) or "none"
    if prefix is None:
        if len(hashes) == 1:
            return hashes[0]
        raise ConfigHashError(
            f"the dataset holds transitions of {len(hashes)} pipeline configs ({listed}); "
            "choose one with --config-hash PREFIX"
        )
    matches = [value for value in hashes if value.startswith(prefix)]
    if len(matches) != 1:
        problem = "matches no" if not matches else "is ambiguous among the"
        raise ConfigHashError(f"config hash prefix {prefix!r} {problem} config hashes in the dataset ({listed})")
    return matches[0]


def scan_transitions(root: str | Path, config_hash: str | None = None) -> tuple[pl.LazyFrame, str]:
    """The transitions of one pipeline config under ``root`` (output root, ``transitions/`` or a file).

    Returns the frame (every TRANSITIONS column, plus ``date`` when ``root`` is a directory) filtered
    to the config hash chosen by :func:`choose_config_hash` with ``config_hash`` as the prefix, and
    that full hash. Raises ``DatasetError`` when there are no files, ``SchemaVersionError`` naming a
    file of another schema version, :class:`ConfigHashError` as ``choose_config_hash`` does.
    """
    path = transitions_directory(root)
    if path == Path(root) and (path / "rollouts").is_dir() and dataset_files(path / "rollouts"):
        raise _no_transitions(path)
    files = dataset_files(path)
    if not files:
        raise DatasetError(f"{path}: no transitions Parquet files (expected date=YYYY-MM-DD/part-<hash>.parquet)")
    _check_versions(files)
    # Files of an older version lack the nullable columns added since (``require_current_version``
    # allowed only those): the scan inserts them as nulls.
    if path.is_file():
        scan = pl.scan_parquet(files, schema=TRANSITIONS_FRAME_SCHEMA, missing_columns="insert")
    else:
        scan = pl.scan_parquet(
            files,
            schema=TRANSITIONS_FRAME_SCHEMA,
            missing_columns="insert",
            hive_partitioning=True,
            hive_schema={"date": pl.String},
            try_parse_hive_dates=False,
        )
    hashes = scan.select(pl.col("pipeline_config_hash").drop_nulls().unique().sort()).collect()
    chosen = choose_config_hash(hashes["pipeline_config_hash"].to_list(), config_hash)
    return scan.filter(pl.col("pipeline_config_hash") == chosen), chosen


def _spread(column: str, name: str) -> list[pl.Expr]:
    """``<name>_mean`` and ``<name>_std`` (sample) of ``column``; NaN never leaks into JSON."""
    return [
        pl.col(column).mean().alias(f"{name}_mean"),
        pl.col(column).std().fill_nan(None).alias(f"{name}_std"),
    ]


def _lengths(column: str) -> list[pl.Expr]:
    """``<column>_mean``, ``_p50`` and ``_p95`` (linear interpolation, as numpy's default)."""
    return [
        pl.col(column).mean().alias(f"{column}_mean"),
        pl.col(column).quantile(0.5, "linear").alias(f"{column}_p50"),
        pl.col(column).quantile(0.95, "linear").alias(f"{column}_p95"),
    ]


def with_token_lengths(transitions: pl.LazyFrame) -> pl.LazyFrame:
    """Adds ``prompt_tokens`` and ``response_tokens`` (UInt32, null without token ids).

    Reads ``prompt_token_ids``, ``response_token_ids``.
    """
    return transitions.with_columns(
        pl.col("prompt_token_ids").list.len().alias(_PROMPT_TOKENS),
        pl.col("response_token_ids").list.len().alias(_RESPONSE_TOKENS),
    )


def overview(transitions: pl.LazyFrame) -> pl.DataFrame:
    """One row: ``transitions, rollouts, tasks, agents, config_hashes, without_token_ids``.

    Reads ``rollout_id``, ``task_id``, ``agent_name``, ``pipeline_config_hash``, ``token_ids_source``.
    """
    return transitions.select(
        pl.len().alias("transitions"),
        pl.col("rollout_id").n_unique().alias("rollouts"),
        pl.col("task_id").drop_nulls().n_unique().alias("tasks"),
        pl.col("agent_name").drop_nulls().n_unique().alias("agents"),
        pl.col("pipeline_config_hash").drop_nulls().n_unique().alias("config_hashes"),
        pl.col("token_ids_source").is_null().sum().alias("without_token_ids"),
    ).collect()


def token_id_coverage(transitions: pl.LazyFrame) -> pl.DataFrame:
    """Per ``token_ids_source`` (``(none)`` for transitions without token ids): ``transitions, share``.

    Reads ``token_ids_source``. Sorted by source.
    """
    return (
        transitions.group_by(pl.col("token_ids_source").fill_null("(none)"))
        .agg(pl.len().alias("transitions"))
        .with_columns((pl.col("transitions") / pl.col("transitions").sum()).alias("share"))
        .sort("token_ids_source")
        .collect()
    )


def by_agent(transitions: pl.LazyFrame) -> pl.DataFrame:
    """Per ``agent_name``: ``transitions``, ``reward_mean/std``, ``credited_reward_mean``,
    ``advantage_mean/std``, and ``prompt_tokens_`` / ``response_tokens_`` ``mean/p50/p95``.

    Reads ``agent_name``, ``reward``, ``credited_reward``, ``advantage``, ``prompt_token_ids``,
    ``response_token_ids``. Rewards are per transition (a rollout counts once per call it made).
    Sorted by agent.
    """
    return (
        with_token_lengths(transitions)
        .group_by("agent_name")
        .agg(
            pl.len().alias("transitions"),
            *_spread("reward", "reward"),
            pl.col("credited_reward").mean().alias("credited_reward_mean"),
            *_spread("advantage", "advantage"),
            *_lengths(_PROMPT_TOKENS),
            *_lengths(_RESPONSE_TOKENS),
        )
        .sort("agent_name", nulls_last=True)
        .collect()
    )


def _rollout_rewards(transitions: pl.LazyFrame, keys: list[str]) -> pl.LazyFrame:
    """One row per rollout: ``rollout_id``, the ``keys`` columns and its ``reward`` (the primary one)."""
    return transitions.group_by("rollout_id").agg(
        *(pl.col(key).first() for key in keys if key != "rollout_id"), pl.col("reward").first()
    )


def by_task(transitions: pl.LazyFrame) -> pl.DataFrame:
    """Per ``task_id``: ``rollouts, transitions, reward_mean, reward_std, zero_signal``.

    Reads ``rollout_id``, ``task_id``, ``reward``. ``zero_signal`` is recomputed with GRPO's own rule
    (all rollout rewards of the task equal, or fewer than two scored): the stored dataset keeps the
    advantages but not the flag. Sorted by task.
    """
    per_rollout = _rollout_rewards(transitions, ["task_id"])
    flagged = grpo_advantages(per_rollout, group_by="task_id", level="rollout")
    counts = transitions.group_by("task_id").agg(pl.len().alias("transitions"))
    return (
        flagged.group_by("task_id")
        .agg(pl.len().alias("rollouts"), *_spread("reward", "reward"), pl.col("zero_signal").any())
        .join(counts, on="task_id", how="left", nulls_equal=True)
        .select("task_id", "rollouts", "transitions", "reward_mean", "reward_std", "zero_signal")
        .sort("task_id", nulls_last=True)
        .collect()
    )


def groups(transitions: pl.LazyFrame, group_by: tuple[str, ...] = DEFAULT_GROUP_BY) -> pl.DataFrame:
    """Per GRPO group (the ``group_by`` columns): ``rollouts, transitions, reward_std, zero_signal,
    distinct_responses, distinct_response_ratio``.

    ``distinct_response_ratio`` is distinct ``response`` texts over transitions in the group: near
    ``1/transitions`` the policy answers everything alike (exploration collapse), so GRPO sees no
    spread to learn from. Reads ``rollout_id``, the ``group_by`` columns, ``reward``, ``response``.
    Sorted by the group columns.
    """
    keys = list(group_by)
    per_rollout = _rollout_rewards(transitions, keys)
    flagged = grpo_advantages(per_rollout, group_by=keys, level="rollout")
    rewards = flagged.group_by(keys).agg(
        pl.len().alias("rollouts"),
        pl.col("reward").std().fill_nan(None).alias("reward_std"),
        pl.col("zero_signal").any(),
    )
    responses = transitions.group_by(keys).agg(
        pl.len().alias("transitions"),
        pl.col("response").n_unique().alias("distinct_responses"),
    )
    return (
        rewards.join(responses, on=keys, how="left", nulls_equal=True)
        .with_columns((pl.col("distinct_responses") / pl.col("transitions")).alias("distinct_response_ratio"))
        .select(
            *keys,
            "rollouts",
            "transitions",
            "reward_std",
            "zero_signal",
            "distinct_responses",
            "distinct_response_ratio",
        )
        .sort(keys, nulls_last=True)
        .collect()
    )


def transition_distributions(transitions: pl.LazyFrame) -> pl.DataFrame:
    """The per-transition values the plots draw: ``agent_name, reward, advantage, prompt_tokens, response_tokens``.

    Reads ``agent_name``, ``reward``, ``advantage``, ``prompt_token_ids``, ``response_token_ids``.
    """
    return (
        with_token_lengths(transitions)
        .select("agent_name", "reward", "advantage", _PROMPT_TOKENS, _RESPONSE_TOKENS)
        .collect()
    )


@dataclass(frozen=True)
class TransitionStats:
    """Everything ``tracelearn transitions stats`` reports, for one pipeline config hash."""

    config_hash: str
    overview: pl.DataFrame
    token_ids: pl.DataFrame
    by_agent: pl.DataFrame
    by_task: pl.DataFrame
    groups: pl.DataFrame

    @property
    def zero_signal_groups(self) -> int:
        """How many GRPO groups carry no learning signal."""
        return int(self.groups["zero_signal"].sum())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: ``config_hash``, ``overview`` (one dict), and a list of rows per table."""
        return {
            "config_hash": self.config_hash,
            "overview": self.overview.row(0, named=True),
            "token_ids": self.token_ids.to_dicts(),
            "by_agent": self.by_agent.to_dicts(),
            "by_task": self.by_task.to_dicts(),
            "groups": self.groups.to_dicts(),
        }


def transition_stats(transitions: pl.LazyFrame, config_hash: str) -> TransitionStats:
    """Every frame of :class:`TransitionStats` over ``transitions`` (one config, e.g. from :func:`scan_transitions`)."""
    return TransitionStats(
        config_hash=config_hash,
        overview=overview(transitions),
        token_ids=token_id_coverage(transitions),
        by_agent=by_agent(transitions),
        by_task=by_task(transitions),
        groups=groups(transitions),
    )


def span_calls(spans: pl.LazyFrame) -> pl.LazyFrame:
    """One row per LLM call: ``agent, rollout_id, task_id, final_reward, latency_ms, input_tokens, output_tokens``.

    ``agent`` is ``agent_name``, else the ``service_name`` (a process without named agents is one
    agent); ``task_id`` and ``final_reward`` are the rollout's, by the rules the rollout builder uses.
    ``spans`` are prepared or raw (prepared here: rollouts and calls as a build makes them). Reads
    spans ``span_type``, ``agent_name``, ``service_name``, ``rollout_id``, ``duration_ns``,
    ``input_tokens``, ``output_tokens`` and what ``rollout_rewards`` / ``rollout_task_ids`` read.
    """
    spans = ensure_prepared(spans)
    rewards = rollout_rewards(spans).select("rollout_id", "final_reward")
    tasks = rollout_task_ids(spans)
    return (
        spans.filter(pl.col("span_type") == sc.TYPE_LLM)
        .select(
            pl.coalesce("agent_name", "service_name").fill_null("(none)").alias("agent"),
            "rollout_id",
            (pl.col("duration_ns") / 1e6).alias("latency_ms"),
            "input_tokens",
            "output_tokens",
        )
        .join(tasks, on="rollout_id", how="left")
        .join(rewards, on="rollout_id", how="left")
    )


def _agent_rollout_rewards(calls: pl.LazyFrame, key: str) -> pl.LazyFrame:
    """Per ``key`` value: ``rollouts`` and ``reward_mean/std`` over its rollouts' final rewards (each once)."""
    return (
        calls.unique(subset=[key, "rollout_id"])
        .group_by(key)
        .agg(pl.col("rollout_id").n_unique().alias("rollouts"), *_spread("final_reward", "reward"))
    )


def span_by_agent(calls: pl.LazyFrame) -> pl.DataFrame:
    """Per ``agent``: ``llm_calls, rollouts, reward_mean/std, latency_ms_mean/p50/p95``,
    ``input_tokens_`` / ``output_tokens_`` ``mean/p50/p95``. Reads the output of :func:`span_calls`.

    A rollout's reward counts once per agent that made calls in it. Sorted by agent.
    """
    usage = calls.group_by("agent").agg(
        pl.len().alias("llm_calls"),
        *_lengths("latency_ms"),
        *_lengths("input_tokens"),
        *_lengths("output_tokens"),
    )
    rewards = _agent_rollout_rewards(calls, "agent")
    return (
        usage.join(rewards, on="agent", how="left")
        .select(
            "agent",
            "llm_calls",
            "rollouts",
            "reward_mean",
            "reward_std",
            pl.exclude("agent", "llm_calls", "rollouts", "reward_mean", "reward_std"),
        )
        .sort("agent")
        .collect()
    )


def span_by_task(calls: pl.LazyFrame) -> pl.DataFrame:
    """Per ``task_id``: ``rollouts, llm_calls, reward_mean/std, input_tokens_mean, output_tokens_mean``.

    Reads the output of :func:`span_calls`. Rollouts without LLM calls are not counted. Sorted by task.
    """
    usage = calls.group_by("task_id").agg(
        pl.len().alias("llm_calls"),
        pl.col("input_tokens").mean().alias("input_tokens_mean"),
        pl.col("output_tokens").mean().alias("output_tokens_mean"),
    )
    rewards = _agent_rollout_rewards(calls, "task_id")
    return (
        rewards.join(usage, on="task_id", how="left", nulls_equal=True)
        .select(
            "task_id", "rollouts", "llm_calls", "reward_mean", "reward_std", "input_tokens_mean", "output_tokens_mean"
        )
        .sort("task_id", nulls_last=True)
        .collect()
    )


@dataclass(frozen=True)
class SpanAnalysis:
    """Per-agent and per-task figures of a spans dataset, and the per-call values the plot draws."""

    by_agent: pl.DataFrame
    by_task: pl.DataFrame
    calls: pl.DataFrame

    def to_dict(self) -> dict[str, Any]:
        """``by_agent`` and ``by_task`` as lists of rows (the per-call values are left out)."""
        return {"by_agent": self.by_agent.to_dicts(), "by_task": self.by_task.to_dicts()}


def span_analysis(spans: pl.LazyFrame) -> SpanAnalysis:
    """:class:`SpanAnalysis` of ``spans`` (e.g. from ``tracelearn.pipelines.spans_input.scan_spans``)."""
    calls = span_calls(spans).collect()
    return SpanAnalysis(by_agent=span_by_agent(calls.lazy()), by_task=span_by_task(calls.lazy()), calls=calls)
