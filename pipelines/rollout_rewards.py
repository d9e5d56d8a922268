"""Rewards per rollout: the emitted ones, and the merge of every reward source into the rollouts.

:func:`rollout_rewards` reads the rewards the agent emitted (reward spans); :func:`merge_rewards`
merges in the reward function's and the feedback table's (``tracelearn.pipelines.rewards`` computes
those) and picks the primary reward. Used by ``tracelearn.pipelines.rollouts``.
"""

import polars as pl

from tracelearn.pipelines.rewards import REWARD_ROWS_SCHEMA, SOURCE_FEEDBACK, SOURCE_FUNCTION, RewardSources
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import ROLLOUTS

__all__ = ["REWARDS_DTYPE", "SOURCE_EMITTED", "merge_rewards", "reward_spans", "rollout_rewards"]

REWARDS_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.Float64}))
TIME_DTYPE = pl.Datetime("ns", "UTC")
ROLLOUT_COLUMNS = tuple(ROLLOUTS.schema.names)
SOURCE_EMITTED = "emitted"
# On a name given by several sources, the later one here wins: feedback (a person or grader after the
# run) over the pipeline's function over what the agent emitted.
SOURCE_PRECEDENCE = {SOURCE_EMITTED: 0, SOURCE_FUNCTION: 1, SOURCE_FEEDBACK: 2}


def reward_spans(spans: pl.LazyFrame) -> pl.LazyFrame:
    """The emitted rewards: spans with ``span_type == 'reward'`` and a reward, ``reward_name`` defaulting to ``reward``.

    Reads ``span_type``, ``reward``, ``reward_name``; adds nothing.
    """
    return spans.filter((pl.col("span_type") == sc.TYPE_REWARD) & pl.col("reward").is_not_null()).with_columns(
        pl.col("reward_name").fill_null("reward")
    )


def rollout_rewards(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Per rollout: ``final_reward``, ``reward_name`` (the primary reward) and ``rewards`` (all, by name).

    Reads reward spans (``span_type == 'reward'``): ``rollout_id``, ``reward``, ``reward_name``,
    ``reward_is_primary``, ``end_time``, ``span_id``. The primary reward is the first emitted one flagged
    primary, else the first emitted; when a name is emitted twice, ``rewards`` keeps the first value.
    """
    rewards = reward_spans(spans).sort(["rollout_id", "end_time", "trace_id", "span_id"])
    not_primary = ~pl.col("reward_is_primary").fill_null(False)
    primary = rewards.group_by("rollout_id").agg(
        pl.col("reward").sort_by(not_primary, maintain_order=True).first().alias("final_reward"),
        pl.col("reward_name").sort_by(not_primary, maintain_order=True).first().alias("reward_name"),
    )
    named = (
        rewards.unique(subset=["rollout_id", "reward_name"], keep="first", maintain_order=True)
        .sort(["rollout_id", "reward_name"])
        .group_by("rollout_id", maintain_order=True)
        .agg(pl.struct(key=pl.col("reward_name"), value=pl.col("reward")).alias("rewards"))
    )
    return primary.join(named, on="rollout_id", how="left")


def _emitted_reward_rows(rollouts: pl.LazyFrame) -> pl.LazyFrame:
    """The rollouts' ``rewards`` maps as reward rows (``REWARD_ROWS_SCHEMA``, ``source = 'emitted'``)."""
    entry = pl.col("__reward")
    return (
        rollouts.select("rollout_id", pl.col("rewards").alias("__reward"))
        .explode("__reward")
        .filter(entry.is_not_null())
        .select(
            "rollout_id",
            entry.struct.field("key").alias("reward_name"),
            entry.struct.field("value").alias("reward"),
            pl.lit(SOURCE_EMITTED).alias("source"),
            pl.lit(None, dtype=TIME_DTYPE).alias("time"),
        )
    )


def _primary_names(rollouts: pl.LazyFrame, extra: pl.LazyFrame, sources: RewardSources) -> pl.LazyFrame:
    """Per rollout: ``reward_name`` of the primary reward (rollouts without one are absent).

    The configured ``primary``; without one, the emitted primary, else the function's reward, else
    the earliest feedback (then by name). Reads rollouts ``rollout_id``, ``reward_name``; the reward
    rows ``rollout_id``, ``reward_name``, ``source``, ``time``.
    """
    if sources.primary is not None:
        return rollouts.select("rollout_id", pl.lit(sources.primary).alias("reward_name"))
    candidates = [
        extra.filter(pl.col("source") == SOURCE_FEEDBACK).select(
            "rollout_id", "reward_name", pl.lit(2).alias("__rank"), "time"
        )
    ]
    if sources.function is not None:
        candidates.append(
            extra.filter(
                (pl.col("source") == SOURCE_FUNCTION) & (pl.col("reward_name") == sources.function.name)
            ).select("rollout_id", "reward_name", pl.lit(1).alias("__rank"), "time")
        )
    if sources.emitted:
        candidates.append(
            rollouts.filter(pl.col("reward_name").is_not_null()).select(
                "rollout_id", "reward_name", pl.lit(0).alias("__rank"), pl.lit(None, dtype=TIME_DTYPE).alias("time")
            )
        )
    return (
        pl.concat(candidates)
        .sort(["rollout_id", "__rank", "time", "reward_name"], nulls_last=True)
        .unique(subset=["rollout_id"], keep="first", maintain_order=True)
        .select("rollout_id", "reward_name")
    )


def merge_rewards(rollouts: pl.LazyFrame, extra: pl.LazyFrame, sources: RewardSources) -> pl.LazyFrame:
    """Replace ``final_reward``, ``reward_name`` and ``rewards`` by the merge of every source's rewards.

    ``rewards`` holds every named reward of the enabled sources (emitted ones from the rollouts'
    ``rewards``, the others from ``extra``, reward rows of ``REWARD_ROWS_SCHEMA``); a name given by
    several sources takes the value of the one latest in ``SOURCE_PRECEDENCE``. ``final_reward`` /
    ``reward_name`` are the primary reward (see :func:`_primary_names`), null when the rollout lacks it.
    Reads the ROLLOUTS columns; returns them, sorted by ``rollout_id``.
    """
    parts = [extra.select(REWARD_ROWS_SCHEMA.names())]
    if sources.emitted:
        parts.append(_emitted_reward_rows(rollouts))
    precedence = pl.col("source").replace_strict(SOURCE_PRECEDENCE, return_dtype=pl.Int8)
    merged = (
        pl.concat(parts)
        .sort(["rollout_id", "reward_name", precedence])
        .unique(subset=["rollout_id", "reward_name"], keep="last", maintain_order=True)
    )
    named = merged.group_by("rollout_id", maintain_order=True).agg(
        pl.struct(key=pl.col("reward_name"), value=pl.col("reward")).alias("rewards")
    )
    primary = _primary_names(rollouts, extra, sources).join(
        merged.select("rollout_id", "reward_name", pl.col("reward").alias("final_reward")),
        on=["rollout_id", "reward_name"],
        how="inner",
    )
    return (
        rollouts.drop("final_reward", "reward_name", "rewards")
        .join(primary, on="rollout_id", how="left")
        .join(named, on="rollout_id", how="left")
        .with_columns(pl.col("rewards").fill_null(pl.lit([], dtype=REWARDS_DTYPE)))
        .select(ROLLOUT_COLUMNS)
        .sort("rollout_id")
    )
