"""What a spans dataset holds: rollouts, LLM calls, tokens, token-id coverage and rewards.

Computed with pyarrow only (the base install, without the pipelines extra, can run it).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tracelearn.collector.spool import SEGMENT_SUFFIX, SPOOL_DIR
from tracelearn.collector.token_join import attach_token_ids
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import dataset_files, read_table
from tracelearn.schemas.identity import task_id_from_messages


@dataclass
class GroupStats:
    """LLM-call figures for one (agent, model) pair."""

    agent: str
    model: str
    llm_calls: int
    input_tokens: int
    output_tokens: int
    with_token_ids: int


@dataclass
class RewardStats:
    name: str
    count: int
    mean: float | None
    primary_count: int


@dataclass
class SpanStats:
    """Summary of a spans dataset."""

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
    spool_segments: int = 0
    spool_bytes: int = 0
    by_agent_model: list[GroupStats] = field(default_factory=list)
    rewards: list[RewardStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_by(table: pa.Table, column: str) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column(column).fill_null("(none)")).to_pylist()
    return {str(item["values"]): int(item["counts"]) for item in counts}


def _sum(table: pa.Table, column: str) -> int:
    value = pc.sum(table.column(column)).as_py() if table.num_rows else None
    return int(value or 0)


def rollout_task_ids(spans: pa.Table) -> dict[str, str]:
    """Task id per rollout: the explicit one if any span carries it, else the first user message hash.

    The pipeline derives rollout task ids by the same rule in polars (``pipelines.rollouts``).
    """
    explicit = spans.filter(pc.is_valid(spans.column("task_id"))).select(["rollout_id", "task_id"])
    tasks = dict(zip(explicit.column("rollout_id").to_pylist(), explicit.column("task_id").to_pylist(), strict=True))
    llm = spans.filter(pc.equal(spans.column("span_type"), sc.TYPE_LLM))
    llm = llm.sort_by([("rollout_id", "ascending"), ("start_time", "ascending")])
    for rollout_id, messages in zip(
        llm.column("rollout_id").to_pylist(), llm.column("input_messages").to_pylist(), strict=True
    ):
        if rollout_id not in tasks:
            derived = task_id_from_messages(messages)
            if derived is not None:
                tasks[rollout_id] = derived
    return tasks


def spans_stats(root: str | Path) -> SpanStats:
    """Read the spans dataset under ``root`` (the data root or its ``spans/`` folder) and summarize it."""
    path = Path(root)
    if (path / "spans").is_dir():
        path = path / "spans"
    files = dataset_files(path)
    # Rollouts flushed by running writers sit in the write-ahead spool until their files roll.
    segments = [p for p in (path / SPOOL_DIR).glob(f"*{SEGMENT_SUFFIX}") if p.is_file()]
    spans = attach_token_ids(read_table(path, "spans"))
    llm = spans.filter(pc.equal(spans.column("span_type"), sc.TYPE_LLM))
    rewards = spans.filter(pc.equal(spans.column("span_type"), sc.TYPE_REWARD))
    primary = rewards.filter(pc.fill_null(rewards.column("reward_is_primary"), False))
    # One primary reward per rollout: the last one emitted wins.
    primary = primary.sort_by([("end_time", "ascending")])
    primary_by_rollout = dict(
        zip(primary.column("rollout_id").to_pylist(), primary.column("reward").to_pylist(), strict=True)
    )
    primary_values = [v for v in primary_by_rollout.values() if v is not None]

    groups = []
    if llm.num_rows:
        keyed = pa.table(
            {
                # A process without named agents is one agent: its service.
                "agent": pc.coalesce(llm.column("agent_name"), llm.column("service_name")).fill_null("(none)"),
                "model": pc.coalesce(llm.column("response_model"), llm.column("request_model")).fill_null("(none)"),
                "input_tokens": llm.column("input_tokens").fill_null(0),
                "output_tokens": llm.column("output_tokens").fill_null(0),
                "has_ids": pc.cast(pc.is_valid(llm.column("response_token_ids")), pa.int64()),
            }
        )
        grouped = keyed.group_by(["agent", "model"]).aggregate(
            [("agent", "count"), ("input_tokens", "sum"), ("output_tokens", "sum"), ("has_ids", "sum")]
        )
        for row in grouped.sort_by([("agent_count", "descending")]).to_pylist():
            groups.append(
                GroupStats(
                    agent=row["agent"],
                    model=row["model"],
                    llm_calls=row["agent_count"],
                    input_tokens=row["input_tokens_sum"] or 0,
                    output_tokens=row["output_tokens_sum"] or 0,
                    with_token_ids=row["has_ids_sum"] or 0,
                )
            )

    reward_stats = []
    if rewards.num_rows:
        keyed = pa.table(
            {
                "name": rewards.column("reward_name").fill_null("reward"),
                "reward": rewards.column("reward"),
                "primary": pc.cast(pc.fill_null(rewards.column("reward_is_primary"), False), pa.int64()),
            }
        )
        for row in (
            keyed.group_by("name")
            .aggregate([("reward", "count"), ("reward", "mean"), ("primary", "sum")])
            .sort_by("name")
            .to_pylist()
        ):
            reward_stats.append(RewardStats(row["name"], row["reward_count"], row["reward_mean"], row["primary_sum"]))

    micros = pa.timestamp("us", tz="UTC")
    start = pc.min(spans.column("start_time")).cast(micros, safe=False).as_py() if spans.num_rows else None
    end = pc.max(spans.column("end_time")).cast(micros, safe=False).as_py() if spans.num_rows else None
    return SpanStats(
        files=len(files),
        spans=spans.num_rows,
        traces=len(pc.unique(spans.column("trace_id"))),
        rollouts=len(pc.unique(spans.column("rollout_id"))),
        tasks=len(set(rollout_task_ids(spans).values())),
        services=sorted(_count_by(spans, "service_name")),
        first_span=start.isoformat(sep=" ", timespec="seconds") if start is not None else None,
        last_span=end.isoformat(sep=" ", timespec="seconds") if end is not None else None,
        llm_calls=llm.num_rows,
        tool_calls=int(pc.sum(pc.equal(spans.column("span_type"), sc.TYPE_TOOL)).as_py() or 0),
        errors=int(pc.sum(pc.equal(spans.column("status_code"), "ERROR")).as_py() or 0),
        input_tokens=_sum(llm, "input_tokens"),
        output_tokens=_sum(llm, "output_tokens"),
        token_ids_status=_count_by(llm, "token_ids_status"),
        rollouts_with_reward=len(primary_values),
        mean_primary_reward=sum(primary_values) / len(primary_values) if primary_values else None,
        spool_segments=len(segments),
        spool_bytes=sum(p.stat().st_size for p in segments),
        by_agent_model=groups,
        rewards=reward_stats,
    )
