"""The spans as every step of a build reads them, made once where the build reads its input.

:func:`prepare_spans` turns a spans frame (as scanned: duplicates from at-least-once delivery,
token ids on their own spans, one call seen by two instrumentations, in one trace or in two, loose
calls with no rollout of their own) into one row per span, one row per LLM call, with each span's final ``rollout_id``
and its ``rollout_identity`` (the rule that made the rollout, ``tracelearn.pipelines.rollout_identity``).

The rollout, transition, reward and statistics functions accept either form: a frame without the
``rollout_identity`` column is prepared first (:func:`ensure_prepared`), so the build, which
prepares each bucket once and collects it, never repeats the work.
"""

import polars as pl

from tracelearn.pipelines.detached_calls import attach_detached_calls
from tracelearn.pipelines.llm_calls import attach_token_ids, inherit_agent_names, merge_nested_llm_spans
from tracelearn.pipelines.rollout_identity import JoinConfig, apply_rollout_identity, rollout_identity_map
from tracelearn.pipelines.spans_input import distinct_spans

__all__ = ["PREPARED_COLUMN", "ensure_prepared", "prepare_spans"]

PREPARED_COLUMN = "rollout_identity"


def prepare_spans(
    spans: pl.LazyFrame, config: JoinConfig | None = None, identity: pl.DataFrame | None = None
) -> pl.LazyFrame:
    """De-duplicate, join token ids, put detached calls back in the trace around them, merge nested
    LLM spans, name unnamed calls after their nearest named ancestor and resolve rollout identity, in
    that order.

    ``identity`` is a precomputed :func:`~tracelearn.pipelines.rollout_identity.rollout_identity_map`
    (a bucketed build computes it over the whole dataset, so a conversation is joined the same way
    whatever bucket it lands in); without it the map is computed from ``spans`` with ``config``.
    Returns the spans columns plus ``rollout_identity``. Collects only small frames (the nested
    span ids, the loose calls); the result is lazy, for the caller to collect once.
    """
    calls = merge_nested_llm_spans(attach_detached_calls(attach_token_ids(distinct_spans(spans))))
    calls = inherit_agent_names(calls)
    if identity is None:
        identity = rollout_identity_map(calls, config)
    return apply_rollout_identity(calls, identity)


def ensure_prepared(spans: pl.LazyFrame) -> pl.LazyFrame:
    """``spans`` as they are when already prepared (they carry ``rollout_identity``), else prepared."""
    if PREPARED_COLUMN in spans.collect_schema().names():
        return spans
    return prepare_spans(spans)
