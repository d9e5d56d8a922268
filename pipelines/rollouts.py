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

from tracelearn.pipelines.prepared import ensure_prepared
from tracelearn.pipelines.rewards import (
    REWARD_ROWS_SCHEMA,
    SOURCE_FEEDBACK,
    FunctionRewardReport,
    RewardSources,
    feedback_reward_rows,
    function_reward_rows,
)
from tracelearn.pipelines.rollout_identity import CONVERSATION, EXPLICIT, SEQUENCE, TRACE
from tracelearn.pipelines.rollout_rewards import REWARDS_DTYPE, merge_rewards, rollout_rewards
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.identity import task_id_from_messages
from tracelearn.schemas.migrations import conform
from tracelearn.schemas.tables import ROLLOUTS

DEFAULT_LATENESS = dt.timedelta(minutes=10)
TIME_DTYPE = pl.Datetime("ns", "UTC")
ERROR = "ERROR"
ROLLOUT_COLUMNS = tuple(ROLLOUTS.schema.names)

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
    function_reward_timeouts: int = 0
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
        with_parent_found(ensure_prepared(spans))
        .filter(~pl.col("parent_found"))
        .select("rollout_id", "trace_id", "span_id", "parent_span_id", "name")
        .sort(["rollout_id", "trace_id", "span_id"])
    )


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


# Finish reasons of a response that asks for tools: the conversation goes on.
_TOOL_FINISH_REASONS = ["tool_calls", "function_call", "tool_use"]
_HAS_TOOL_CALLS = r'"tool_calls"\s*:\s*\[\s*\{'
_TOOL_CALL_NAME = r'"function"\s*:\s*\{\s*"name"\s*:\s*"([^"]*)"'
# Tools whose call is the agent's answer (smolagents ends every run with one): no call follows them.
FINAL_ANSWER_TOOLS = ["final_answer"]
_IDENTITY_RANK = {EXPLICIT: 0, SEQUENCE: 1, CONVERSATION: 2, TRACE: 3}
# What makes a trace a run of the agent: a call of the model or a tool, or a reward.
_RUN_SPAN_TYPES = [sc.TYPE_LLM, sc.TYPE_TOOL, sc.TYPE_REWARD]
COMPLETE = "complete"


def _conversation_ended() -> pl.Expr:
    """Aggregation over a rollout's spans in start order: its last LLM call answered, without asking
    for a tool or by calling only a final-answer tool (:data:`FINAL_ANSWER_TOOLS`)."""
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    output = pl.col("output_messages").filter(is_llm).last()
    finish = pl.col("finish_reason").filter(is_llm).last()
    called = output.str.extract_all(_TOOL_CALL_NAME).list.eval(pl.element().str.extract(_TOOL_CALL_NAME, 1))
    answered = called.list.len().gt(0) & called.list.eval(pl.element().is_in(FINAL_ANSWER_TOOLS)).list.all()
    no_tools = ~output.str.contains(_HAS_TOOL_CALLS).fill_null(False) & ~finish.is_in(_TOOL_FINISH_REASONS).fill_null(
        False
    )
    return output.is_not_null() & (no_tools | answered.fill_null(False))


def rollout_rows(spans: pl.LazyFrame) -> pl.LazyFrame:
    """:func:`build_rollouts` plus ``complete`` (Boolean): the rollout cannot grow any more.

    Complete: a ``trace`` rollout whose root span is there (spans are written when they end) and no
    span misses its parent; an ``explicit`` one whose ``tracelearn.rollout`` span is there (its other
    traces may still come until then); a ``conversation`` or ``sequence`` one whose last call
    answered without asking for tools (a final finish reason) or called only a final-answer tool.
    Reads prepared spans.
    """
    spans = ensure_prepared(spans)
    # "first" and "last" below are well defined: the join in with_parent_found does not keep row
    # order, so the spans are sorted once, after it.
    ordered = with_parent_found(spans).sort(["rollout_id", "start_time", "trace_id", "span_id"])
    is_root = pl.col("parent_span_id").is_null()
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    is_error = pl.col("status_code") == ERROR
    orphans = (~pl.col("parent_found")).any()
    identity = pl.col("rollout_identity").sort_by(pl.col("rollout_identity").replace_strict(_IDENTITY_RANK)).first()
    error_message = pl.coalesce("status_message", pl.format("{} ended in ERROR", "name"))
    complete = (
        pl.when(identity == TRACE)
        .then(is_root.any() & ~orphans)
        .when(identity == EXPLICIT)
        .then((is_root & (pl.col("span_type") == sc.TYPE_ROLLOUT)).any() & ~orphans)
        .otherwise(_conversation_ended())
    )
    counts = ordered.group_by("rollout_id").agg(
        pl.col("attempt_id").drop_nulls().first(),
        pl.col("trace_id").unique().sort().alias("trace_ids"),
        identity.alias("identity"),
        pl.col("group_id").drop_nulls().first(),
        pl.col("service_name").drop_nulls().first(),
        pl.col("agent_name").drop_nulls().unique(maintain_order=True).alias("agents"),
        pl.col("start_time").min(),
        pl.col("end_time").max(),
        pl.when(is_error.any())
        .then(pl.lit("error"))
        .when((~is_root.any()) & orphans)
        .then(pl.lit("incomplete"))
        .otherwise(pl.lit("ok"))
        .alias("status"),
        error_message.filter(is_error).sort_by(pl.col("end_time").filter(is_error)).first().alias("error_message"),
        pl.len().cast(pl.Int64).alias("n_spans"),
        is_llm.sum().cast(pl.Int64).alias("n_llm_calls"),
        (pl.col("span_type") == sc.TYPE_TOOL).sum().cast(pl.Int64).alias("n_tool_calls"),
        is_error.sum().cast(pl.Int64).alias("n_errors"),
        pl.col("input_tokens").filter(is_llm).sum().cast(pl.Int64),
        pl.col("output_tokens").filter(is_llm).sum().cast(pl.Int64),
        complete.fill_null(False).alias(COMPLETE),
        (pl.col("span_type").is_in(_RUN_SPAN_TYPES) | is_error | pl.col("task_id").is_not_null()).any().alias("__ran"),
    )
    # A trace where the agent ran nothing (a framework's setup span such as LangGraph's create_agent,
    # a token-id span whose call was recorded in another trace) is no rollout; one that names its task
    # is, even when the agent gave up before calling anything: that is the task's failure.
    counts = counts.filter(pl.col("__ran") | (pl.col("identity") != TRACE))
    return (
        counts.join(rollout_task_ids(spans), on="rollout_id", how="left")
        .join(rollout_rewards(ordered), on="rollout_id", how="left")
        .with_columns(pl.col("rewards").fill_null(pl.lit([], dtype=REWARDS_DTYPE)))
        .select(*ROLLOUT_COLUMNS, COMPLETE)
        .sort("rollout_id")
    )


def build_rollouts(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Spans -> one row per rollout, with exactly the ROLLOUTS columns, sorted by ``rollout_id``.

    ``spans`` are prepared (``tracelearn.pipelines.prepared``) or raw (prepared here). Reads the
    spans columns ``rollout_id``, ``rollout_identity``, ``attempt_id``, ``trace_id``, ``span_id``,
    ``parent_span_id``, ``name``, ``task_id``, ``group_id``, ``service_name``, ``agent_name``,
    ``span_type``, ``start_time``, ``end_time``, ``status_code``, ``status_message``,
    ``input_messages``, ``output_messages``, ``finish_reason``, ``input_tokens``, ``output_tokens``
    and the reward columns. ``rewards`` is a list of ``{key, value}`` structs (``rollouts_to_arrow``
    turns it into the Arrow map). Status: ``error`` if any span ended in ERROR (``error_message``:
    the first one's message, by end time), else ``incomplete`` if the rollout has orphan spans and
    no root span, else ``ok``. ``identity``: the rule that made the rollout (a rollout mixing
    rules takes the first of explicit, sequence, conversation, trace). A trace holding no LLM call,
    tool call, reward, error or task id is no rollout (a framework's setup span, a token-id span cut
    off from its call's trace).
    """
    return rollout_rows(spans).select(ROLLOUT_COLUMNS)


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
    """(closed, deferred) rollouts for a build at ``now``; reads ``end_time`` and, when there,
    ``complete`` (see :func:`rollout_rows`); adds nothing.

    Closed: complete, or the last span ended strictly before ``now - lateness``; late spans of a
    closed rollout are only picked up by rebuilding its partition. Deferred: the rest, rollouts that
    may still grow, left for a later build.
    """
    cutoff = pl.lit(watermark_cutoff(now, lateness), dtype=TIME_DTYPE)
    closed = pl.col("end_time") < cutoff
    if COMPLETE in rollouts.collect_schema().names():
        closed = closed | pl.col(COMPLETE)
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
        function_reward_timeouts=function.timeouts,
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
    ``spans`` (prepared or raw) may hold any set of whole rollouts.
    """
    config = config or RolloutConfig()
    rewards = rewards or RewardSources()
    spans = ensure_prepared(spans)
    # Collected once: closed, deferred, the reward merge and the orphan filter all read it, and a
    # lazy plan would rebuild it for each of them.
    built_rollouts = rollout_rows(spans).collect().lazy()
    closed, deferred = split_by_watermark(built_rollouts, now, config.lateness)
    closed, deferred = closed.select(ROLLOUT_COLUMNS), deferred.select(ROLLOUT_COLUMNS)
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
