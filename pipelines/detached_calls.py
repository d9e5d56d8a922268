"""LLM calls recorded outside the trace of the LLM span around them, put back inside it.

Some instrumentations do not make their spans the current OpenTelemetry span (OpenInference's
LangChain instrumentation keeps its own context), so the client span of the same call
(Traceloop's ``openai.chat``) starts a trace of its own: each call lands twice, once inside the
agent's trace and once as a loose call. :func:`attach_detached_calls` finds such a loose call
inside an LLM span of another trace (same service, process and thread; the loose call starts and
ends within that span; their messages equal, compared canonically) and moves the loose call's
trace under that span, where ``tracelearn.pipelines.llm_calls.merge_nested_llm_spans`` merges the
two into one call (the client span lends its response id, usage and token ids).

Pairs are found with an as-of join (the latest-starting LLM span of the process and thread before
the loose call), so only one candidate per loose call is decoded and compared; a loose call whose
candidate does not contain it or says something else stays loose.
"""

import polars as pl

from tracelearn.pipelines.rollout_identity import canonical_message_hashes, loose_traces
from tracelearn.schemas import semconv as sc

__all__ = ["PAIRS_SCHEMA", "attach_detached_calls", "detached_pairs"]

_KEYS = ["service_name", "pid", "thread"]
PAIRS_SCHEMA = {
    "trace_id": pl.String,
    "__outer_trace_id": pl.String,
    "__outer_span_id": pl.String,
    "__outer_rollout_id": pl.String,
}


def _calls(spans: pl.LazyFrame) -> pl.LazyFrame:
    """LLM spans: ids, service, process, thread and times (no messages: the as-of join reads these only)."""
    attributes = pl.col("attributes")
    return spans.filter(pl.col("span_type") == sc.TYPE_LLM).select(
        "trace_id",
        "span_id",
        "parent_span_id",
        "rollout_id",
        pl.col("service_name").fill_null(""),
        attributes.map.get(sc.PROCESS_PID).alias("pid"),
        attributes.map.get(sc.THREAD_ID).alias("thread"),
        "start_time",
        "end_time",
    )


def _conversation_keys(calls: pl.DataFrame) -> pl.DataFrame:
    """``call, key``: the prefix key over each call's input and output messages (equal messages, equal key)."""
    hashes = canonical_message_hashes(calls)
    return hashes.group_by("call").agg(pl.col("prefix_key").sort_by("position").last().alias("key"))


def _messages(spans: pl.LazyFrame, ids: pl.DataFrame) -> pl.DataFrame:
    """``call`` (the span id), ``input_messages``, ``output_messages`` of the spans ``ids`` names."""
    return (
        spans.join(ids.lazy(), on=["trace_id", "span_id"], how="semi")
        .select(pl.col("span_id").alias("call"), "input_messages", "output_messages")
        .unique(subset=["call"], keep="first")
        .collect()
    )


def detached_pairs(spans: pl.LazyFrame) -> pl.DataFrame:
    """The loose calls found inside an LLM span of another trace (:data:`PAIRS_SCHEMA`): the loose
    call's ``trace_id`` and that span's trace, span and rollout ids. Collects small frames only."""
    loose = loose_traces(spans).collect()
    if loose.height == 0:
        return pl.DataFrame(schema=PAIRS_SCHEMA)
    calls = _calls(spans)
    inner = (
        calls.join(loose.lazy(), on="trace_id", how="semi")
        .filter(pl.col("parent_span_id").is_null() & pl.col("pid").is_not_null() & pl.col("thread").is_not_null())
        .collect()
    )
    outer = (
        calls.join(loose.lazy(), on="trace_id", how="anti")
        .filter(pl.col("pid").is_not_null())
        .select(
            *_KEYS,
            *(pl.col(c).alias(f"__outer_{c}") for c in ("trace_id", "span_id", "rollout_id", "start_time", "end_time")),
        )
        .collect()
    )
    paired = (
        inner.sort("start_time", "trace_id")
        .join_asof(
            outer.sort("__outer_start_time", "__outer_span_id"),
            left_on="start_time",
            right_on="__outer_start_time",
            by=_KEYS,
            strategy="backward",
            check_sortedness=False,
        )
        .filter(pl.col("__outer_span_id").is_not_null() & (pl.col("end_time") <= pl.col("__outer_end_time")))
    )
    if paired.height == 0:
        return pl.DataFrame(schema=PAIRS_SCHEMA)
    inner_keys = _conversation_keys(_messages(spans, paired.select("trace_id", "span_id")))
    outer_ids = paired.select(pl.col("__outer_trace_id").alias("trace_id"), pl.col("__outer_span_id").alias("span_id"))
    outer_keys = _conversation_keys(_messages(spans, outer_ids))
    return (
        paired.join(inner_keys.rename({"call": "span_id"}), on="span_id")
        .join(outer_keys.rename({"call": "__outer_span_id", "key": "__outer_key"}), on="__outer_span_id")
        .filter(pl.col("key") == pl.col("__outer_key"))
        .select(list(PAIRS_SCHEMA))
    )


def attach_detached_calls(spans: pl.LazyFrame, pairs: pl.DataFrame | None = None) -> pl.LazyFrame:
    """``spans`` with each detached loose call's trace moved under the LLM span it ran inside.

    ``pairs``: :func:`detached_pairs` of ``spans`` (computed here when ``None``). The loose trace's
    spans take the outer span's ``trace_id`` and ``rollout_id``; its root's parent becomes the outer
    span. Same columns as ``spans``; ``spans`` untouched when there is no pair (the common case
    costs one pass over the id columns).
    """
    pairs = detached_pairs(spans) if pairs is None else pairs
    if pairs.height == 0:
        return spans
    columns = spans.collect_schema().names()
    moved = pl.col("__outer_trace_id").is_not_null()
    return (
        spans.join(pairs.lazy(), on="trace_id", how="left", maintain_order="left")
        .with_columns(
            pl.when(moved & pl.col("parent_span_id").is_null())
            .then(pl.col("__outer_span_id"))
            .otherwise(pl.col("parent_span_id"))
            .alias("parent_span_id"),
            pl.when(moved).then(pl.col("__outer_rollout_id")).otherwise(pl.col("rollout_id")).alias("rollout_id"),
            pl.when(moved).then(pl.col("__outer_trace_id")).otherwise(pl.col("trace_id")).alias("trace_id"),
        )
        .select(columns)
    )
