"""Joining token ids recorded on their own spans back onto the LLM call they belong to.

When no LLM span is current while the HTTP request runs (LangChain's callback-created spans, or no
LLM instrumentation at all), the token-id hook records a ``tracelearn.token_ids`` span instead, with
the call's ``gen_ai.response.id``. This joins those rows onto the LLM rows of the same trace and
response id, so every reader sees the ids on the LLM call itself.

This is the pyarrow form, for the base install (``spans stats``); the pipeline applies the same rule
lazily in polars (``tracelearn.pipelines.transitions.attach_token_ids``): change both together.
"""

import pyarrow as pa
import pyarrow.compute as pc

from tracelearn.schemas import semconv as sc

TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids", "response_logprobs", "token_ids_status")
ROW_INDEX = "__row"
TOKEN_INDEX = "__token_row"


def attach_token_ids(spans: pa.Table) -> pa.Table:
    """``spans`` with LLM rows' token columns filled from matching ``token_ids`` rows (same row order)."""
    is_token_row = pc.and_(
        pc.equal(spans.column("span_type"), sc.TYPE_TOKEN_IDS), pc.is_valid(spans.column("response_id"))
    )
    tokens = spans.filter(is_token_row)
    if tokens.num_rows == 0:
        return spans
    # One token row per call: a retried request may have produced two; keep the first.
    first: dict[tuple[str, str], int] = {}
    keys = zip(tokens.column("trace_id").to_pylist(), tokens.column("response_id").to_pylist(), strict=True)
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    tokens = tokens.take(sorted(first.values()))
    # Join on the keys only (Arrow joins cannot carry map columns), then gather the token columns.
    left = spans.select(["trace_id", "response_id"]).append_column(ROW_INDEX, pa.array(range(spans.num_rows)))
    right = tokens.select(["trace_id", "response_id"]).append_column(TOKEN_INDEX, pa.array(range(tokens.num_rows)))
    matched = left.join(right, keys=["trace_id", "response_id"], join_type="left outer").sort_by(ROW_INDEX)
    token_index = matched.column(TOKEN_INDEX)
    is_llm = pc.equal(spans.column("span_type"), sc.TYPE_LLM)
    for column in TOKEN_COLUMNS:
        own = spans.column(column)
        other = tokens.column(column).take(token_index)
        if column == "token_ids_status":
            # The LLM row says not_captured when only the sibling token span saw the call.
            take_other = pc.and_(is_llm, pc.is_valid(other))
        else:
            take_other = pc.and_(is_llm, pc.and_(pc.is_null(own), pc.is_valid(other)))
        spans = spans.set_column(
            spans.schema.get_field_index(column), column, pc.if_else(pc.fill_null(take_other, False), other, own)
        )
    return spans
