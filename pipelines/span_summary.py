"""What a spans dataset holds, counted the way a build would count it: ``tracelearn spans stats``.

The spans are prepared as a build prepares them (``tracelearn.pipelines.prepared``), so the figures
are the pipeline's: rollouts are the rollouts a build would make (loose calls joined by
conversation, counted by the rule that joined them), an LLM call seen by two instrumentations
counts once (its tokens too), token ids recorded on their own spans count on their call, and the
reward of a rollout is its primary one. Spans typed ``other`` are counted by instrumentation scope,
so a user sees what was captured but not understood. Spans still in the write-ahead spool (not
rolled into Parquet yet) are counted apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from tracelearn.collector.spool import SPOOL_DIR, pending_segments
from tracelearn.pipelines.prepared import prepare_spans
from tracelearn.pipelines.rollout_rewards import reward_spans
from tracelearn.pipelines.rollouts import build_rollouts
from tracelearn.pipelines.spans_input import scan_files, spans_files, spans_location
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import locate_files

__all__ = ["AgentModelStats", "PreparedSpans", "RewardStats", "SpanStats", "read_prepared_spans", "spans_stats"]

# Columns no figure here reads: left out of the scan (events and links can be most of a span's bytes).
_UNREAD = ("events", "links", "resource_attributes")
_NONE = "(none)"


@dataclass
class AgentModelStats:
    """LLM-call figures for one (agent, model) pair."""

    agent: str
    model: str
    llm_calls: int
    input_tokens: int
    output_tokens: int
    with_token_ids: int


@dataclass
class RewardStats:
    """Emitted rewards of one name: how many, their mean, how many flagged primary."""

    name: str
    count: int
    mean: float | None
    primary_count: int


@dataclass
class SpanStats:
    """Summary of a spans dataset (see the module docstring for how each figure is counted)."""

    files: int
    spans: int
    traces: int
    rollouts: int
    tasks: int
    services: list[str]
    first_span: str | None
    last_span: str | None
    llm_calls: int
    tool_calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    token_ids_status: dict[str, int]
    rollouts_with_reward: int
    mean_primary_reward: float | None
    rollouts_by_identity: dict[str, int] = field(default_factory=dict)
    other_spans_by_scope: dict[str, int] = field(default_factory=dict)
    spool_segments: int = 0
    spool_bytes: int = 0
    by_agent_model: list[AgentModelStats] = field(default_factory=list)
    rewards: list[RewardStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _counts(frame: pl.DataFrame, column: str) -> dict[str, int]:
    """``{value: rows}`` of ``column`` (nulls as ``(none)``), sorted by value."""
    grouped = frame.group_by(pl.col(column).fill_null(_NONE)).len().sort(column)
    return {str(value): int(count) for value, count in grouped.iter_rows()}


def _by_agent_model(calls: pl.DataFrame) -> list[AgentModelStats]:
    # A process without named agents is one agent: its service.
    grouped = (
        calls.group_by(
            pl.coalesce("agent_name", "service_name").fill_null(_NONE).alias("agent"),
            pl.coalesce("response_model", "request_model").fill_null(_NONE).alias("model"),
        )
        .agg(
            pl.len().alias("llm_calls"),
            pl.col("input_tokens").sum(),
            pl.col("output_tokens").sum(),
            pl.col("response_token_ids").is_not_null().sum().alias("with_token_ids"),
        )
        .sort(["llm_calls", "agent", "model"], descending=[True, False, False])
    )
    return [
        AgentModelStats(str(agent), str(model), int(calls), int(inputs or 0), int(outputs or 0), int(ids))
        for agent, model, calls, inputs, outputs, ids in grouped.iter_rows()
    ]


def _reward_stats(spans: pl.LazyFrame) -> list[RewardStats]:
    grouped = (
        reward_spans(spans)
        .group_by(pl.col("reward_name").alias("name"))
        .agg(
            pl.col("reward").count().alias("count"),
            pl.col("reward").mean().alias("mean"),
            pl.col("reward_is_primary").fill_null(False).sum().alias("primary_count"),
        )
        .sort("name")
        .collect()
    )
    return [RewardStats(**row) for row in grouped.to_dicts()]


def _spool(spans_root: Path) -> tuple[int, int]:
    """Segments and bytes in the write-ahead spool under ``spans_root`` (a local directory; else none)."""
    segments = pending_segments(spans_root / SPOOL_DIR)
    return len(segments), sum(p.stat().st_size for p in segments)


def _time(value: Any) -> str | None:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else None


@dataclass(frozen=True)
class PreparedSpans:
    """A spans dataset read once and prepared as a build prepares it (collected, held lazily)."""

    location: str
    files: int
    spans: int
    traces: int
    prepared: pl.LazyFrame | None  # None: no Parquet file yet


def read_prepared_spans(root: str | Path) -> PreparedSpans:
    """Read and prepare the spans under ``root`` (a data root or its ``spans/``, a file or a URI).

    Raises ``DatasetError`` when ``root`` does not exist, ``SchemaVersionError`` naming a file of a
    newer schema.
    """
    location = spans_location(root)
    if not locate_files(location).paths:
        return PreparedSpans(location, 0, 0, 0, None)
    files = spans_files(root)
    scan = scan_files(files)
    spans, traces = (
        scan.select(
            pl.struct("trace_id", "span_id").n_unique().alias("spans"), pl.col("trace_id").n_unique().alias("traces")
        )
        .collect()
        .row(0)
    )
    prepared = prepare_spans(scan.drop(c for c in _UNREAD if c in scan.collect_schema().names()))
    return PreparedSpans(location, len(files.paths), int(spans), int(traces), prepared.collect().lazy())


def spans_stats(root: str | Path, dataset: PreparedSpans | None = None) -> SpanStats:
    """Summarize the spans dataset under ``root`` (read with :func:`read_prepared_spans` unless given).

    A dataset whose spans all wait in the spool gives zeros and the spool's size. Raises as
    :func:`read_prepared_spans` does.
    """
    dataset = dataset or read_prepared_spans(root)
    segments, spool_bytes = _spool(Path(dataset.location))
    spans = dataset.prepared
    if spans is None:
        empty = SpanStats(0, 0, 0, 0, 0, [], None, None, 0, 0, 0, 0, 0, {}, 0, None)
        empty.spool_segments, empty.spool_bytes = segments, spool_bytes
        return empty
    span_type = pl.col("span_type")
    overview = spans.select(
        pl.col("start_time").min().alias("first_span"),
        pl.col("end_time").max().alias("last_span"),
        (span_type == sc.TYPE_TOOL).sum().alias("tool_calls"),
        (pl.col("status_code") == "ERROR").sum().alias("errors"),
    ).collect()
    calls = spans.filter(span_type == sc.TYPE_LLM).collect()
    rollouts = build_rollouts(spans).select("identity", "task_id", "final_reward").collect()
    rewarded = rollouts.get_column("final_reward").drop_nulls()
    other = spans.filter(span_type == sc.TYPE_OTHER).select("scope_name").collect()
    row = overview.row(0, named=True)
    return SpanStats(
        files=dataset.files,
        spans=dataset.spans,
        traces=dataset.traces,
        rollouts=rollouts.height,
        tasks=rollouts.get_column("task_id").drop_nulls().n_unique(),
        services=sorted(spans.select(pl.col("service_name").drop_nulls().unique()).collect().to_series().to_list()),
        first_span=_time(row["first_span"]),
        last_span=_time(row["last_span"]),
        llm_calls=calls.height,
        tool_calls=int(row["tool_calls"]),
        errors=int(row["errors"]),
        input_tokens=int(calls.get_column("input_tokens").sum() or 0),
        output_tokens=int(calls.get_column("output_tokens").sum() or 0),
        token_ids_status=_counts(calls, "token_ids_status"),
        rollouts_with_reward=rewarded.len(),
        mean_primary_reward=float(rewarded.mean()) if rewarded.len() else None,  # type: ignore[arg-type]
        rollouts_by_identity=_counts(rollouts, "identity"),
        other_spans_by_scope=_counts(other, "scope_name"),
        spool_segments=segments,
        spool_bytes=spool_bytes,
        by_agent_model=_by_agent_model(calls),
        rewards=_reward_stats(spans),
    )
