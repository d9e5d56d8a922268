"""Spans -> rollouts + credited transitions on disk: the experience pipeline end to end, one call.

:func:`build_transitions` is what ``tracelearn transitions build`` and the
``tracelearn_build_transitions`` DAG run. Steps, each a library function over polars LazyFrames:

1. scan the spans dataset (only one ``date=`` partition when ``date`` is given) and, when it is
   larger than ``bucket_bytes`` uncompressed, split it into buckets of whole rollouts and whole
   advantage groups (``tracelearn.pipelines.buckets``; a conversation joined from calls without a
   common trace stays in one bucket): steps 2-6 then run once per bucket, so memory is bounded by
   the bucket size, not the dataset size (user stages see one bucket at a time). Each bucket is
   prepared once (``tracelearn.pipelines.prepared``: de-duplicated, token ids joined, nested LLM
   spans merged, rollout identity resolved) and collected;
2. ``build_closed_rollouts`` with the config's watermark and missing-reward policy (a rollout that
   may still grow and whose last span ended less than ``lateness`` before ``now`` is deferred to a
   later build; a complete one, whose root span or conversation has ended, is built at once);
3. ``extract_transitions`` with the config's ``select`` and ``config_hash``; then
   ``merge_trajectories`` when ``trajectory: true``;
4. join ``rollout_status`` (the rollout's ``status``) and compute a first GRPO pass, so stages may
   read ``rollout_status``, ``advantage`` and ``zero_signal`` (e.g. ``drop_zero_signal_groups``);
5. the config's stages (built-in or ``module:function``), each checked to keep the TRANSITIONS columns;
6. ``assign_credit`` (``credit:``; ``process`` credits every emitted reward other than the primary one
   to the last call that started before it was emitted) and ``grpo_advantages`` (``advantage:``),
   recomputed over the rows the stages kept;
7. write ``out/transitions/date=YYYY-MM-DD/part-<hash16>.parquet`` and
   ``out/rollouts/date=YYYY-MM-DD/part-<hash16>.parquet`` (``date`` = the rollout's start date, UTC;
   ``hash16`` = the first 16 hex digits of the config hash): each bucket is appended to temp files
   that are renamed into place only when every bucket built, so a failed build leaves the previous
   output untouched.

Late spans: a rollout is built once its last span is older than the watermark; spans that arrive
later still reach it, because every build reads the whole partition again and replaces its output.
The summary's ``late_span_rollouts`` counts the rollouts a rebuild grew, so late data is visible.

Idempotent: the output is a pure function of (spans, config, watermark): rows are sorted
(rollouts by ``rollout_id``; transitions by ``rollout_id, step_index`` within each bucket, buckets in
order), no build time is written, the buckets depend only on the input,
and a rerun replaces the same files, so the same input and config give byte-identical files and
never duplicates. Files of another config hash in the same partition are left alone (they are a
different dataset version; readers filter on ``pipeline_config_hash``).

Limitations, reported rather than silent: with ``date``, a rollout whose spans cross midnight is
built from the given day's spans only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from tracelearn.collector.spool import SPOOL_DIR, pending_segments
from tracelearn.pipelines.advantages import grpo_advantages, zero_signal_counts
from tracelearn.pipelines.buckets import (
    BUCKET_BYTES,
    assign_buckets,
    bucket_columns,
    bucket_count,
    rollout_group_keys,
    scan_bucket,
    spill_buckets,
)
from tracelearn.pipelines.config import (
    PipelineConfig,
    config_hash,
    join_config,
    reward_sources,
    rollout_config,
)
from tracelearn.pipelines.credit import assign_credit
from tracelearn.pipelines.detached_calls import attach_detached_calls, detached_pairs
from tracelearn.pipelines.partition_output import COMPRESSION, OUTPUT_DATE, DatePartitionFiles, late_span_rollouts
from tracelearn.pipelines.prepared import ensure_prepared, prepare_spans
from tracelearn.pipelines.rewards import RewardSources
from tracelearn.pipelines.rollout_identity import JoinConfig, apply_rollout_identity, rollout_identity_map
from tracelearn.pipelines.rollout_rewards import reward_spans
from tracelearn.pipelines.rollouts import build_closed_rollouts, rollouts_to_arrow
from tracelearn.pipelines.spans_input import distinct_spans, scan_files, spans_files, spans_location
from tracelearn.pipelines.stages import BoundStage, resolve_stages, run_stages
from tracelearn.pipelines.transitions import (
    TRANSITION_COLUMNS,
    extract_transitions,
    merge_trajectories,
    transition_counts,
    transitions_to_arrow,
)
from tracelearn.schemas.dataset import DatasetFiles

__all__ = ["COMPRESSION", "BuildResult", "build_transitions", "output_file_name", "process_rewards"]

logger = logging.getLogger(__name__)
SUMMARY_KEYS: tuple[str, ...] = (
    "rollouts",
    "deferred",
    "dropped_without_reward",
    "without_reward",
    "orphan_spans",
    "error_rollouts",
    "function_rewards",
    "function_reward_missing_input",
    "function_reward_errors",
    "function_reward_invalid",
    "function_reward_timeouts",
    "feedback_rewards",
    "transitions",
    "without_token_ids",
    "groups",
    "zero_signal_groups",
    "buckets",
    "late_span_rollouts",
)
# Repeated values in transitions; prompts, responses and token lists stay plain (mostly distinct).
TRANSITION_DICTIONARY_COLUMNS = (
    "rollout_id",
    "attempt_id",
    "task_id",
    "group_id",
    "agent_name",
    "model",
    "token_ids_source",
    "trace_id",
    "pipeline_config_hash",
)


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote and counted.

    ``summary`` keys: ``rollouts`` (written), ``deferred`` (left for a later build by the watermark),
    ``dropped_without_reward``, ``without_reward`` (built rollouts with no reward, before the
    missing-reward policy), ``orphan_spans``, ``error_rollouts``, ``function_rewards`` (rollouts the
    reward function rewarded) and its failures by cause ``function_reward_missing_input``,
    ``function_reward_errors`` (of which ``function_reward_timeouts`` did not return in time),
    ``function_reward_invalid`` (the first one is logged),
    ``feedback_rewards`` (rollouts with a feedback reward), ``transitions`` (written),
    ``without_token_ids``, ``groups``, ``zero_signal_groups``, ``buckets`` (how many pieces the
    spans were built in), ``late_span_rollouts`` (rollouts this build rewrote with more spans than
    the previous build of their partition saw), ``files_written``. ``notes``: one line each for what
    the user may want to act on (rollouts kept without a reward, spans still in the spool).
    """

    transitions_files: list[Path]
    rollouts_files: list[Path]
    summary: dict[str, int]
    config_hash: str
    notes: tuple[str, ...] = ()


def output_file_name(pipeline_config_hash: str) -> str:
    """The file name a build with this config writes in each date partition: ``part-<hash16>.parquet``."""
    return f"part-{pipeline_config_hash[:16]}.parquet"


def _check_date(date: str | None) -> None:
    if date is None:
        return
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise ValueError(f"date {date!r} is not a YYYY-MM-DD date") from None
    if len(date) != len("YYYY-MM-DD"):
        raise ValueError(f"date {date!r} is not a YYYY-MM-DD date")


def process_rewards(spans: pl.LazyFrame, rollouts: pl.LazyFrame, transitions: pl.LazyFrame) -> pl.LazyFrame:
    """Intermediate rewards for ``credit: {method: process}``: ``rollout_id, after_step, value``.

    Every emitted reward span (``span_type == 'reward'``) whose name is not the rollout's primary
    ``reward_name`` is a process reward; ``after_step`` is the ``step_index`` of the last transition
    of its rollout that started at or before the reward span ended. Rewards emitted before the first
    call are dropped (there is no call to credit). Reads spans ``span_type``, ``rollout_id``,
    ``reward``, ``reward_name``, ``end_time``, ``trace_id``, ``span_id``, ``start_time``; rollouts
    ``rollout_id``, ``reward_name``; transitions ``rollout_id``, ``step_index``, ``trace_id``, ``span_id``.
    ``spans`` are prepared or raw (prepared here).
    """
    spans = ensure_prepared(spans)
    primary = rollouts.select("rollout_id", pl.col("reward_name").alias("__primary"))
    rewards = (
        reward_spans(spans)
        .join(primary, on="rollout_id", how="inner")
        .filter(pl.col("reward_name") != pl.col("__primary").fill_null(""))
        .select("rollout_id", pl.col("end_time").alias("__at"), pl.col("reward").alias("value"))
        .sort("__at")
    )
    starts = spans.select("trace_id", "span_id", pl.col("start_time").alias("__at"))
    calls = (
        transitions.select("rollout_id", "step_index", "trace_id", "span_id")
        .join(starts, on=["trace_id", "span_id"], how="inner")
        .select("rollout_id", pl.col("step_index").cast(pl.Int64).alias("after_step"), "__at")
        .sort("__at")
    )
    return (
        rewards.join_asof(calls, on="__at", by="rollout_id", strategy="backward", check_sortedness=False)
        .filter(pl.col("after_step").is_not_null())
        .select("rollout_id", "after_step", "value")
    )


@dataclass(frozen=True)
class _BucketBuild:
    """One bucket's output: credited transitions and rollouts (each with ``OUTPUT_DATE``) and its counts."""

    transitions: pl.DataFrame
    rollouts: pl.DataFrame
    counts: dict[str, int]


def _build_bucket(
    lf: pl.LazyFrame,
    config: PipelineConfig,
    stages: list[BoundStage],
    hash_: str,
    now: dt.datetime,
    rewards: RewardSources,
    identity: pl.DataFrame | None,
) -> _BucketBuild:
    """Steps 2-6 of the module docstring over the spans of whole rollouts and whole advantage groups.

    ``identity``: the loose traces' rollout ids computed over the whole dataset (bucketed builds),
    or ``None`` to compute them from this bucket (a build of one bucket).
    """
    # A bucket is bounded by bucket_bytes, so its spans are read, decoded and prepared once here
    # rather than once by each query below (rollouts, transitions, rewards).
    lf = prepare_spans(lf, join_config(config), identity).collect().lazy()
    build = build_closed_rollouts(lf, now, rollout_config(config), rewards)
    rollouts = build.rollouts.lazy()

    transitions = extract_transitions(
        lf,
        rollouts,
        agent=config.select.agent,
        llm_call=None if config.select.llm_call is None else list(config.select.llm_call),
        pipeline_config_hash=hash_,
    )
    if config.trajectory:
        transitions = merge_trajectories(transitions)
    advantage = config.advantage
    group_by = list(advantage.group_by)

    def advantages(frame: pl.LazyFrame) -> pl.LazyFrame:
        return grpo_advantages(
            frame,
            group_by=group_by,
            normalize_std=advantage.normalize_std,
            level=advantage.level,
            epsilon=advantage.epsilon,
        )

    status = rollouts.select("rollout_id", pl.col("status").alias("rollout_status"))
    staged = transitions.join(status, on="rollout_id", how="left", maintain_order="left")
    # The first pass only feeds the stages (the final pass replaces its columns); transition level
    # needs credited rewards, so it is computed after credit only.
    if stages and advantage.level == "rollout":
        staged = advantages(staged)
    staged = run_stages(staged, stages, TRANSITION_COLUMNS)
    credit = config.credit
    credited = assign_credit(
        staged,
        credit.method,
        gamma=credit.gamma,
        process_rewards=process_rewards(lf, rollouts, staged) if credit.method == "process" else None,
        include_final_reward=credit.include_final_reward,
    )
    final = advantages(credited)
    start_date = pl.col("start_time").dt.strftime("%Y-%m-%d").alias(OUTPUT_DATE)
    starts = rollouts.select("rollout_id", start_date)
    result = final.join(starts, on="rollout_id", how="left").sort(["rollout_id", "step_index"]).collect()

    counts = transition_counts(result.lazy())
    zero = zero_signal_counts(result.lazy(), group_by)
    summary = build.summary
    return _BucketBuild(
        transitions=result.select(*TRANSITION_COLUMNS, OUTPUT_DATE),
        rollouts=build.rollouts.with_columns(start_date),
        counts={
            "rollouts": build.rollouts.height,
            "deferred": summary.deferred,
            "dropped_without_reward": summary.without_reward if config.reward.missing == "drop" else 0,
            "without_reward": summary.without_reward,
            "orphan_spans": summary.orphan_spans,
            "error_rollouts": summary.error_rollouts,
            "function_rewards": summary.function_rewards,
            "function_reward_missing_input": summary.function_reward_missing_input,
            "function_reward_errors": summary.function_reward_errors,
            "function_reward_invalid": summary.function_reward_invalid,
            "function_reward_timeouts": summary.function_reward_timeouts,
            "feedback_rewards": summary.feedback_rewards,
            "transitions": counts["transitions"],
            "without_token_ids": counts["without_token_ids"],
            "groups": zero["groups"],
            "zero_signal_groups": zero["zero_signal_groups"],
        },
    )


def _bucketed_spans(
    files: DatasetFiles,
    group_by: tuple[str, ...],
    bucket_bytes: int,
    out_root: Path,
    cleanup: contextlib.ExitStack,
    join: JoinConfig,
) -> Iterator[tuple[pl.LazyFrame, pl.DataFrame | None]]:
    """The spans to build, one LazyFrame per bucket (see ``tracelearn.pipelines.buckets``), each with
    the rollout identity map of the whole dataset (``None`` for a build of one bucket).

    Buckets are spilled to a temp directory under ``out_root`` (same file system as the output),
    removed when ``cleanup`` closes.
    """
    lf = scan_files(files)
    columns = bucket_columns(group_by)
    buckets = bucket_count(files, bucket_bytes) if columns and not files.single_file else 1
    if buckets == 1:
        yield lf, None
        return
    out_root.mkdir(parents=True, exist_ok=True)
    spill = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".build-", dir=out_root)))
    # Joined conversations span several traces: their identity is settled over the whole dataset
    # (only the loose calls are read), so each lands whole in one bucket and joins the same way there.
    distinct = distinct_spans(lf)
    detached = detached_pairs(distinct)
    attached = attach_detached_calls(distinct, detached)
    identity = rollout_identity_map(attached, join)
    keys = rollout_group_keys(apply_rollout_identity(attached, identity), columns).collect(engine="streaming")
    assignment = assign_buckets(keys, columns, buckets)
    # Spans keep their own trace and rollout ids on disk: route loose traces by their joined rollout
    # and detached calls by the rollout of the span they ran inside.
    routes = pl.concat(
        [identity.select("trace_id", "rollout_id"), detached.select("trace_id", rollout_id="__outer_rollout_id")]
    )
    for directory in spill_buckets(files, assignment, buckets, spill, routes):
        bucket = scan_bucket(directory)
        if bucket is not None:
            yield bucket, identity


def spool_note(spans: str | Path) -> str | None:
    """A line about spans still in the write-ahead spool under ``spans`` (local data only), or ``None``."""
    spool = Path(spans_location(spans)) / SPOOL_DIR
    segments = pending_segments(spool)
    if not segments:
        return None
    size = sum(path.stat().st_size for path in segments) / 1024
    return (
        f"{len(segments)} spool segment(s) ({size:.0f} KiB) under {spool} hold spans not in Parquet yet: they "
        f"roll into Parquet when their writer does; if that process is gone, run `tracelearn spans replay {spans}`"
    )


def reward_note(config: PipelineConfig, without_reward: int) -> str | None:
    """A line saying how to add a reward when rollouts have none and no reward source is configured."""
    reward = config.reward
    if without_reward == 0 or reward.function is not None or reward.feedback:
        return None
    fate = {"keep": "kept with reward and advantage null, which training skips", "drop": "dropped"}.get(
        reward.missing, f"given reward {reward.fill_value}"
    )
    return (
        f"{without_reward} rollout(s) have no reward ({fate}): set reward.function: module:function in "
        "pipeline.yaml, or emit rewards from the agent with tracelearn.emit_reward"
    )


def build_transitions(
    spans: str | Path,
    out: str | Path,
    config: PipelineConfig | None = None,
    *,
    date: str | None = None,
    now: dt.datetime | None = None,
    bucket_bytes: int = BUCKET_BYTES,
) -> BuildResult:
    """Build rollouts and credited transitions from ``spans`` and write them under ``out``.

    ``spans`` is the data root or its ``spans/`` directory, a local path or an object-storage URI
    (``s3://bucket/data``; the output ``out`` is local); ``date`` (``YYYY-MM-DD``) limits the
    build to that spans date partition (``None``: all dates); ``now`` is the watermark reference
    (an aware datetime; default the current UTC time); ``bucket_bytes`` bounds the uncompressed
    spans held in memory at once (see ``tracelearn.pipelines.buckets``). See the module docstring
    for the steps and the output layout. Raises :class:`PipelineConfigError` (before reading data)
    for a config the build cannot run, ``ValueError`` for a malformed ``date``, ``StageError``
    naming a stage that breaks the frame, and the spans scan's ``DatasetError`` /
    ``SchemaVersionError``.
    """
    config = config or PipelineConfig()
    _check_date(date)
    stages = resolve_stages(config.stages)
    hash_ = config_hash(config)
    now = now or dt.datetime.now(dt.UTC)
    out_root = Path(out)
    files = spans_files(spans, date)
    rewards = reward_sources(config, spans)
    file_name = output_file_name(hash_)
    transitions_files = DatePartitionFiles(
        out_root / "transitions", file_name, transitions_to_arrow, list(TRANSITION_DICTIONARY_COLUMNS)
    )
    rollout_frames: list[pl.DataFrame] = []
    totals: Counter[str] = Counter()
    rollouts_files = DatePartitionFiles(out_root / "rollouts", file_name, rollouts_to_arrow)
    try:
        with contextlib.ExitStack() as cleanup:
            join = join_config(config)
            parts = _bucketed_spans(files, config.advantage.group_by, bucket_bytes, out_root, cleanup, join)
            for part, identity in parts if files.paths else ():
                bucket = _build_bucket(part, config, stages, hash_, now, rewards, identity)
                transitions_files.append(bucket.transitions, ["rollout_id", "step_index"])
                rollout_frames.append(bucket.rollouts)
                totals.update(bucket.counts)
                totals["buckets"] += 1
        if rollout_frames:
            built = pl.concat(rollout_frames)
            totals["late_span_rollouts"] = late_span_rollouts(out_root / "rollouts", file_name, built)
            rollouts_files.append(built, ["rollout_id"])
    except BaseException:
        transitions_files.abort()
        rollouts_files.abort()
        raise
    written_transitions = transitions_files.commit()
    written_rollouts = rollouts_files.commit()
    summary = {key: totals[key] for key in SUMMARY_KEYS}
    summary["files_written"] = len(written_transitions) + len(written_rollouts)
    notes = tuple(note for note in (reward_note(config, summary["without_reward"]), spool_note(spans)) if note)
    for note in notes:
        logger.info("%s", note)
    return BuildResult(
        transitions_files=written_transitions,
        rollouts_files=written_rollouts,
        summary=summary,
        config_hash=hash_,
        notes=notes,
    )
