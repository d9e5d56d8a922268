"""Spans -> rollouts: one row per rollout, the first stage of the experience pipeline.

Identity: a span belongs to the rollout named by its ``rollout_id`` column, which capture fills with
the trace id unless ``tracelearn.rollout()`` or baggage set one (so one trace is one rollout, and an
explicit id may join several traces). The task id is the explicit one if any span carries it, else
the hash of the first user message of the rollout's earliest LLM call
(``tracelearn.schemas.identity.task_id_from_messages``, shared with ``tracelearn spans stats``).

Orphans: a span whose parent is not among its rollout's spans (the parent was lost, or is still in
flight) stays in its rollout and is counted (``orphan_spans``); a rollout with orphans and no root
span is ``incomplete``.

Late spans: ``split_by_watermark`` keeps a rollout out of a build until its last span ended more than
``lateness`` before the build time; deferred rollouts are returned and counted, and the next build
(whose input still holds their spans) includes them. A rollout row is a pure function of all of its
spans, so rebuilding a partition after late spans arrived yields the complete row; the output writer
replaces the previous output of that partition (reruns replace, never duplicate). Output is sorted by
``rollout_id``, so the same input gives the same rows in the same order.

Rewards: ``build_rollouts`` reads the emitted ones (reward spans); ``build_closed_rollouts`` merges in
the reward function's and the feedback table's (``tracelearn.pipelines.rewards``) for the closed
rollouts, then applies the missing-reward policy to the merged primary reward.
"""

import datetime as dt
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import polars as pl
import pyarrow as pa

from tracelearn.pipelines.rewards import (
    REWARD_ROWS_SCHEMA,
    SOURCE_FEEDBACK,
    SOURCE_FUNCTION,
    FunctionRewardReport,
    RewardSources,
    feedback_reward_rows,
    function_reward_rows,
)
from tracelearn.pipelines.spans_input import distinct_spans
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.identity import task_id_from_messages
from tracelearn.schemas.migrations import conform
from tracelearn.schemas.tables import ROLLOUTS

DEFAULT_LATENESS = dt.timedelta(minutes=10)
REWARDS_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.Float64}))
TIME_DTYPE = pl.Datetime("ns", "UTC")
ERROR = "ERROR"
ROLLOUT_COLUMNS = tuple(ROLLOUTS.schema.names)
SOURCE_EMITTED = "emitted"
# On a name given by several sources, the later one here wins: feedback (a person or grader after the
# run) over the pipeline's function over what the agent emitted.
SOURCE_PRECEDENCE = {SOURCE_EMITTED: 0, SOURCE_FUNCTION: 1, SOURCE_FEEDBACK: 2}

logger = logging.getLogger(__name__)

MissingRewardPolicy = Literal["keep", "drop", "fill"]


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are built: watermark lateness and what to do with rollouts that have no reward.

    ``missing_reward``: ``keep`` (final_reward stays null), ``drop`` (the rollout is left out), or
    ``fill`` (final_reward = ``fill_reward`` under ``fill_reward_name``; ``rewards`` stays as emitted).
    """

    lateness: dt.timedelta = DEFAULT_LATENESS
    missing_reward: MissingRewardPolicy = "keep"
    fill_reward: float = 0.0
    fill_reward_name: str = "missing"


@dataclass(frozen=True)
class RolloutSummary:
    """Counts reported by a rollout build."""

    rollouts: int
    with_reward: int
    without_reward: int
    deferred: int
    orphan_spans: int
    error_rollouts: int
    incomplete_rollouts: int
    error_spans: int
    function_rewards: int = 0
    function_reward_missing_input: int = 0
    function_reward_errors: int = 0
    function_reward_invalid: int = 0
    feedback_rewards: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RolloutBuild:
    """The result of ``build_closed_rollouts``: closed rollouts, deferred ones, the counts, and the
    first reward-function failure (``None`` when none failed) for the report."""

    rollouts: pl.DataFrame
    deferred: pl.DataFrame
    summary: RolloutSummary
    first_function_failure: str | None = None


def with_parent_found(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``parent_found`` (bool): the span is a root or its parent is among its rollout's spans.

    Reads ``rollout_id``, ``trace_id``, ``span_id``, ``parent_span_id``.
    """
    parents = (
        spans.select("rollout_id", "trace_id", pl.col("span_id").alias("parent_span_id"))
        .unique()
        .with_columns(pl.lit(True).alias("parent_found"))
    )
    return spans.join(parents, on=["rollout_id", "trace_id", "parent_span_id"], how="left").with_columns(
        (pl.col("parent_span_id").is_null() | pl.col("parent_found").fill_null(False)).alias("parent_found")
    )


def orphan_spans(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Spans whose parent is missing from their rollout: ``rollout_id, trace_id, span_id, parent_span_id, name``.

    Reads ``rollout_id``, ``trace_id``, ``span_id``, ``parent_span_id``, ``name``. Sorted by rollout and span.
    """
    return (
        with_parent_found(distinct_spans(spans))
        .filter(~pl.col("parent_found"))
        .select("rollout_id", "trace_id", "span_id", "parent_span_id", "name")
        .sort(["rollout_id", "trace_id", "span_id"])
    )


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


_CALL_ORDER = ["start_time", "trace_id", "span_id"]


def first_by_call_order(column: str) -> pl.Expr:
    """The earliest non-null ``column`` of a group (by start time, then trace and span id), as an aggregation."""
    present = pl.col(column).is_not_null()
    return pl.col(column).filter(present).sort_by([pl.col(c).filter(present) for c in _CALL_ORDER]).first()


def rollout_task_ids(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Per rollout: ``task_id``, the explicit one (earliest span carrying it) else the derived one.

    Reads ``rollout_id``, ``task_id``, ``span_type``, ``input_messages``, ``start_time``, ``trace_id``,
    ``span_id`` (one row per span). The derived id hashes the first user message of the earliest LLM
    call with messages. Only that call's messages are read: its key is found on the id columns first,
    so no sort or group ever carries the prompts; the hash runs once per distinct prompt, not per span.
    """
    explicit = spans.group_by("rollout_id").agg(first_by_call_order("task_id").alias("explicit_task_id"))
    calls = spans.filter((pl.col("span_type") == sc.TYPE_LLM) & pl.col("input_messages").is_not_null())
    first_call = calls.group_by("rollout_id").agg(
        pl.col("trace_id").sort_by(_CALL_ORDER).first(), pl.col("span_id").sort_by(_CALL_ORDER).first()
    )
    first_prompt = first_call.join(
        calls.select("rollout_id", "trace_id", "span_id", "input_messages"),
        on=["rollout_id", "trace_id", "span_id"],
        how="inner",
    )
    derived = (
        first_prompt.select("input_messages")
        .unique()
        .with_columns(
            pl.col("input_messages")
            .map_elements(task_id_from_messages, return_dtype=pl.String)
            .alias("derived_task_id")
        )
    )
    derived_by_rollout = first_prompt.join(derived, on="input_messages", how="left").select(
        "rollout_id", "derived_task_id"
    )
    return explicit.join(derived_by_rollout, on="rollout_id", how="left").select(
        "rollout_id", pl.coalesce("explicit_task_id", "derived_task_id").alias("task_id")
    )


def build_rollouts(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Spans -> one row per rollout, with exactly the ROLLOUTS columns, sorted by ``rollout_id``.

    Reads the spans columns ``rollout_id``, ``attempt_id``, ``trace_id``, ``span_id``,
    ``parent_span_id``, ``task_id``, ``group_id``, ``service_name``, ``agent_name``, ``span_type``,
    ``start_time``, ``end_time``, ``status_code``, ``input_messages``, ``input_tokens``,
    ``output_tokens`` and the reward columns. ``rewards`` is a list of ``{key, value}`` structs
    (``rollouts_to_arrow`` turns it into the Arrow map). Status: ``error`` if a root or rollout span
    failed, else ``incomplete`` if the rollout has orphan spans and no root span, else ``ok``.
    """
    # "first" in the aggregations below is well defined: the join in with_parent_found does not keep
    # row order, so the de-duplicated spans are sorted once, after it.
    distinct = distinct_spans(spans)
    ordered = with_parent_found(distinct).sort(["rollout_id", "start_time", "trace_id", "span_id"])
    is_root = pl.col("parent_span_id").is_null()
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    is_error = pl.col("status_code") == ERROR
    top_error = ((is_root | (pl.col("span_type") == sc.TYPE_ROLLOUT)) & is_error).any()
    incomplete = (~is_root.any()) & (~pl.col("parent_found")).any()
    counts = ordered.group_by("rollout_id").agg(
        pl.col("attempt_id").drop_nulls().first(),
        pl.col("trace_id").unique().sort().alias("trace_ids"),
        pl.col("group_id").drop_nulls().first(),
        pl.col("service_name").drop_nulls().first(),
        pl.col("agent_name").drop_nulls().unique(maintain_order=True).alias("agents"),
        pl.col("start_time").min(),
        pl.col("end_time").max(),
        pl.when(top_error)
        .then(pl.lit("error"))
        .when(incomplete)
        .then(pl.lit("incomplete"))
        .otherwise(pl.lit("ok"))
        .first()
        .alias("status"),
        pl.len().cast(pl.Int64).alias("n_spans"),
        is_llm.sum().cast(pl.Int64).alias("n_llm_calls"),
        (pl.col("span_type") == sc.TYPE_TOOL).sum().cast(pl.Int64).alias("n_tool_calls"),
        is_error.sum().cast(pl.Int64).alias("n_errors"),
        pl.col("input_tokens").filter(is_llm).sum().cast(pl.Int64),
        pl.col("output_tokens").filter(is_llm).sum().cast(pl.Int64),
    )
    return (
        counts.join(rollout_task_ids(distinct), on="rollout_id", how="left")
        .join(rollout_rewards(ordered), on="rollout_id", how="left")
        .with_columns(pl.col("rewards").fill_null(pl.lit([], dtype=REWARDS_DTYPE)))
        .select(ROLLOUT_COLUMNS)
        .sort("rollout_id")
    )


def watermark_cutoff(now: dt.datetime, lateness: dt.timedelta = DEFAULT_LATENESS) -> dt.datetime:
    """The instant before which a rollout's last span must have ended for the rollout to be built."""
    if now.tzinfo is None:
        raise ValueError(f"build time {now.isoformat()} has no time zone; pass an aware datetime (UTC)")
    if lateness < dt.timedelta(0):
        raise ValueError(f"lateness {lateness} is negative")
    return now.astimezone(dt.UTC) - lateness


def split_by_watermark(
    rollouts: pl.LazyFrame, now: dt.datetime, lateness: dt.timedelta = DEFAULT_LATENESS
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(closed, deferred) rollouts for a build at ``now``; reads ``end_time``, adds nothing.

    Closed: the last span ended strictly before ``now - lateness``; late spans of a closed rollout are
    only picked up by rebuilding its partition. Deferred: the rest, left for a later build.
    """
    cutoff = pl.lit(watermark_cutoff(now, lateness), dtype=TIME_DTYPE)
    closed = pl.col("end_time") < cutoff
    return rollouts.filter(closed), rollouts.filter(~closed)


def apply_missing_reward(rollouts: pl.LazyFrame, config: RolloutConfig) -> pl.LazyFrame:
    """Drop or fill rollouts without ``final_reward`` per ``config.missing_reward``; reads ``final_reward``."""
    if config.missing_reward == "drop":
        return rollouts.filter(pl.col("final_reward").is_not_null())
    if config.missing_reward == "fill":
        missing = pl.col("final_reward").is_null()
        return rollouts.with_columns(
            pl.when(missing).then(pl.lit(config.fill_reward)).otherwise(pl.col("final_reward")).alias("final_reward"),
            pl.when(missing)
            .then(pl.lit(config.fill_reward_name))
            .otherwise(pl.col("reward_name"))
            .alias("reward_name"),
        )
    return rollouts


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


def rollout_summary(
    rollouts: pl.DataFrame,
    deferred: pl.DataFrame,
    orphans: pl.DataFrame,
    function: FunctionRewardReport | None = None,
    feedback_rollouts: int = 0,
) -> RolloutSummary:
    """Counts over built rollouts (before any missing-reward policy), deferred ones, orphan spans, the
    reward function's report and the number of rollouts given a feedback reward."""
    with_reward = int(rollouts.get_column("final_reward").is_not_null().sum())
    status = rollouts.get_column("status")
    function = function or FunctionRewardReport()
    return RolloutSummary(
        rollouts=rollouts.height,
        with_reward=with_reward,
        without_reward=rollouts.height - with_reward,
        deferred=deferred.height,
        orphan_spans=orphans.height,
        error_rollouts=int((status == "error").sum()),
        incomplete_rollouts=int((status == "incomplete").sum()),
        error_spans=int(rollouts.get_column("n_errors").sum()),
        function_rewards=function.rewarded,
        function_reward_missing_input=function.missing_input,
        function_reward_errors=function.errors,
        function_reward_invalid=function.invalid,
        feedback_rewards=feedback_rollouts,
    )


def build_closed_rollouts(
    spans: pl.LazyFrame,
    now: dt.datetime,
    config: RolloutConfig | None = None,
    rewards: RewardSources | None = None,
) -> RolloutBuild:
    """Build the rollouts closed at ``now``, defer the open ones, merge the ``rewards`` sources
    (default: the emitted rewards only), apply the missing-reward policy, count.

    The summary's ``orphan_spans`` counts orphans of the closed rollouts only (deferred ones may still
    receive their parents). Rewards of a rollout depend only on its own spans and feedback, so
    ``spans`` may hold any set of whole rollouts.
    """
    config = config or RolloutConfig()
    rewards = rewards or RewardSources()
    # Collected once: closed, deferred, the reward merge and the orphan filter all read it, and a
    # lazy plan would rebuild it for each of them.
    built_rollouts = build_rollouts(spans).collect().lazy()
    closed, deferred = split_by_watermark(built_rollouts, now, config.lateness)
    report = FunctionRewardReport()
    extra = [pl.LazyFrame(schema=REWARD_ROWS_SCHEMA)]
    if rewards.function is not None:
        function_rows, report = function_reward_rows(spans, closed, rewards.function)
        extra.append(function_rows.lazy())
        if report.first_failure is not None:
            logger.warning(
                "reward function %s gave no reward for %d rollouts; first: %s",
                rewards.function.path,
                report.missing_input + report.errors + report.invalid,
                report.first_failure,
            )
    if rewards.feedback is not None:
        extra.append(feedback_reward_rows(rewards.feedback, closed))
    reward_rows = pl.concat(extra)
    if not rewards.emitted_only:
        closed = merge_rewards(closed, reward_rows, rewards)
    feedback_rollouts = reward_rows.filter(pl.col("source") == SOURCE_FEEDBACK).select(pl.col("rollout_id").n_unique())
    orphans = orphan_spans(spans).join(closed.select("rollout_id"), on="rollout_id", how="semi")
    built, open_, orphan_rows, kept, feedback_count = pl.collect_all(
        [closed, deferred, orphans, apply_missing_reward(closed, config), feedback_rollouts]
    )
    summary = rollout_summary(built, open_, orphan_rows, report, int(feedback_count.item()))
    return RolloutBuild(rollouts=kept, deferred=open_, summary=summary, first_function_failure=report.first_failure)


def rollouts_to_arrow(rollouts: pl.DataFrame) -> pa.Table:
    """The rollouts as an Arrow table of the ROLLOUTS schema (with version metadata), ready to write."""
    table = rollouts.with_columns(pl.col("rewards").cast(pl.Map(pl.String, pl.Float64))).to_arrow()
    return conform(table, ROLLOUTS)
