"""Spans -> rollouts + credited transitions on disk: the experience pipeline end to end, one call.

:func:`build_transitions` is what ``tracelearn transitions build`` and the
``tracelearn_build_transitions`` DAG run. Steps, each a library function over polars LazyFrames:

1. scan the spans dataset (only one ``date=`` partition when ``date`` is given);
2. ``build_closed_rollouts`` with the config's watermark and missing-reward policy (rollouts whose
   last span ended less than ``lateness`` before ``now`` are deferred to a later build);
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
   ``hash16`` = the first 16 hex digits of the config hash) atomically.

Idempotent: the output is a pure function of (spans, config, watermark): rows are sorted
(rollouts by ``rollout_id``; transitions by ``rollout_id, step_index``), no build time is written,
and a rerun replaces the same files, so the same input and config give byte-identical files and
never duplicates. Files of another config hash in the same partition are left alone (they are a
different dataset version; readers filter on ``pipeline_config_hash``).

Limitations, reported rather than silent: ``reward.source`` ``function`` and ``feedback`` are not
wired into the build yet (:class:`PipelineConfigError` before any data is read); with ``date``, a
rollout whose spans cross midnight is built from the given day's spans only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from tracelearn.collector.atomic_files import partition_directory, write_parquet_atomically
from tracelearn.pipelines.advantages import grpo_advantages, zero_signal_counts
from tracelearn.pipelines.config import (
    PipelineConfig,
    PipelineConfigError,
    config_hash,
    rollout_config,
)
from tracelearn.pipelines.credit import assign_credit
from tracelearn.pipelines.rollouts import build_closed_rollouts, reward_spans, rollouts_to_arrow
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.pipelines.stages import resolve_stages, run_stages
from tracelearn.pipelines.transitions import (
    TRANSITION_COLUMNS,
    extract_transitions,
    merge_trajectories,
    transition_counts,
    transitions_to_arrow,
)

__all__ = ["COMPRESSION", "BuildResult", "build_transitions", "output_file_name", "process_rewards"]

COMPRESSION = "zstd"
_DATE = "__output_date"


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote and counted.

    ``summary`` keys: ``rollouts`` (written), ``deferred`` (left for a later build by the watermark),
    ``dropped_without_reward``, ``without_reward`` (built rollouts with no reward, before the
    missing-reward policy), ``orphan_spans``, ``error_rollouts``, ``transitions`` (written),
    ``without_token_ids``, ``groups``, ``zero_signal_groups``, ``files_written``.
    """

    transitions_files: list[Path]
    rollouts_files: list[Path]
    summary: dict[str, int]
    config_hash: str


def output_file_name(pipeline_config_hash: str) -> str:
    """The file name a build with this config writes in each date partition: ``part-<hash16>.parquet``."""
    return f"part-{pipeline_config_hash[:16]}.parquet"


def _check_buildable(config: PipelineConfig) -> None:
    """Refuse, before any data is read, what the build cannot do yet (named in the message)."""
    if config.reward.source != "emitted":
        raise PipelineConfigError(
            "<config>",
            "reward.source",
            f"reward.source={config.reward.source} is not wired into the build yet; "
            "use reward.source 'emitted' (emit_reward spans)",
        )


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
    """
    primary = rollouts.select("rollout_id", pl.col("reward_name").alias("__primary"))
    rewards = (
        reward_spans(spans)
        .unique(subset=["trace_id", "span_id"], keep="first")
        .join(primary, on="rollout_id", how="inner")
        .filter(pl.col("reward_name") != pl.col("__primary").fill_null(""))
        .select("rollout_id", pl.col("end_time").alias("__at"), pl.col("reward").alias("value"))
        .sort("__at")
    )
    starts = spans.select("trace_id", "span_id", pl.col("start_time").alias("__at")).unique(
        subset=["trace_id", "span_id"], keep="first"
    )
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


def _write_partitions(
    frame: pl.DataFrame,
    root: Path,
    file_name: str,
    to_arrow: Callable[[pl.DataFrame], pa.Table],
    sort_by: list[str],
) -> list[Path]:
    """Write one file per ``_DATE`` value of ``frame`` under ``root/date=<value>/file_name``."""
    written = []
    for (date,), part in sorted(frame.partition_by(_DATE, as_dict=True, include_key=False).items()):
        directory = partition_directory(root, ["date"], (date,))
        written.append(write_parquet_atomically(to_arrow(part.sort(sort_by)), directory, file_name, COMPRESSION))
    return written


def build_transitions(
    spans: str | Path,
    out: str | Path,
    config: PipelineConfig | None = None,
    *,
    date: str | None = None,
    now: dt.datetime | None = None,
) -> BuildResult:
    """Build rollouts and credited transitions from ``spans`` and write them under ``out``.

    ``spans`` is the data root or its ``spans/`` directory; ``date`` (``YYYY-MM-DD``) limits the
    build to that spans date partition (``None``: all dates); ``now`` is the watermark reference
    (an aware datetime; default the current UTC time). See the module docstring for the steps and
    the output layout. Raises :class:`PipelineConfigError` (before reading data) for a config the
    build cannot run, ``ValueError`` for a malformed ``date``, ``StageError`` naming a stage that
    breaks the frame, and the spans scan's ``DatasetError`` / ``SchemaVersionError``.
    """
    config = config or PipelineConfig()
    _check_buildable(config)
    _check_date(date)
    stages = resolve_stages(config.stages)
    hash_ = config_hash(config)
    now = now or dt.datetime.now(dt.UTC)
    out_root = Path(out)

    lf = scan_spans(spans)
    if date is not None:
        lf = lf.filter(pl.col("date") == date)
    build = build_closed_rollouts(lf, now, rollout_config(config))
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
    start_date = pl.col("start_time").dt.strftime("%Y-%m-%d").alias(_DATE)
    starts = rollouts.select("rollout_id", start_date)
    result = final.join(starts, on="rollout_id", how="left").sort(["rollout_id", "step_index"]).collect()

    counts = transition_counts(result.lazy())
    zero = zero_signal_counts(result.lazy(), group_by)
    file_name = output_file_name(hash_)
    rollout_frame = build.rollouts.with_columns(start_date)
    transitions_files = _write_partitions(
        result.select(*TRANSITION_COLUMNS, _DATE),
        out_root / "transitions",
        file_name,
        transitions_to_arrow,
        ["rollout_id", "step_index"],
    )
    rollouts_files = _write_partitions(
        rollout_frame, out_root / "rollouts", file_name, rollouts_to_arrow, ["rollout_id"]
    )
    summary = build.summary
    return BuildResult(
        transitions_files=transitions_files,
        rollouts_files=rollouts_files,
        summary={
            "rollouts": build.rollouts.height,
            "deferred": summary.deferred,
            "dropped_without_reward": summary.without_reward if config.reward.missing == "drop" else 0,
            "without_reward": summary.without_reward,
            "orphan_spans": summary.orphan_spans,
            "error_rollouts": summary.error_rollouts,
            "transitions": counts["transitions"],
            "without_token_ids": counts["without_token_ids"],
            "groups": zero["groups"],
            "zero_signal_groups": zero["zero_signal_groups"],
            "files_written": len(transitions_files) + len(rollouts_files),
        },
        config_hash=hash_,
    )
