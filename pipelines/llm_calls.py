"""One row per LLM call: token ids joined onto their call, nested LLM spans merged into one call.

Two instrumentations often see one call: a framework span (Traceloop's ``openai-agents``
``openai.response``, LangChain's ``ChatOpenAI.chat``) around the client span (``openai.chat``), each
typed ``llm``. Counted as they are, every call would count twice (calls, tokens, transitions) and
the outer span often lacks the response. :func:`merge_nested_llm_spans` keeps the outermost span of
such a nest as the call (its ids, times and place in the tree) and gives it each call field from
whichever span has it, a nested span's first (the client span saw the request as sent). Token ids that the
token-id hook recorded on a ``tracelearn.token_ids`` span are joined onto the call first
(:func:`attach_token_ids`), so they travel up with it.

A call left without an agent name takes its nearest named ancestor's (:func:`inherit_agent_names`):
capture names calls after the ancestors it understands, normalization names more spans than that.

All run once, where a build reads its spans (``tracelearn.pipelines.prepared``). Everything is
polars expressions over LazyFrames; only small frames of span ids are collected.
"""

import polars as pl

from tracelearn.schemas import semconv as sc

__all__ = [
    "AGENT_DEPTH",
    "CALL_COLUMNS",
    "NESTING_DEPTH",
    "TOKEN_COLUMNS",
    "TOKEN_SPAN_COLUMNS",
    "attach_token_ids",
    "inherit_agent_names",
    "merge_nested_llm_spans",
    "nested_llm_spans",
]

TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids", "response_logprobs", "token_ids_status")
# What a token-id span lends its call besides the token columns: the version its response named (the
# hook reads the response's system_fingerprint; an LLM span's own value wins).
TOKEN_SPAN_COLUMNS = (*TOKEN_COLUMNS, "model_version")
# What the call said, taken from whichever span of a nest has it (token columns travel as one group).
CALL_COLUMNS = (
    "operation_name",
    "request_model",
    "response_model",
    "response_id",
    "finish_reason",
    "input_messages",
    "output_messages",
    "input_tokens",
    "output_tokens",
    "request_temperature",
    "request_top_p",
    "request_top_k",
    "model_version",
)
# How many ancestors of an LLM span are walked to find an enclosing LLM span (through agent, chain
# or HTTP spans in between). Deeper nesting is not detected: the spans then count as two calls.
NESTING_DEPTH = 4
# How many ancestors of an LLM call without an agent name are walked to find the agent it ran in
# (agent > step > model wrapper > call is common; deeper graphs nest a few more).
AGENT_DEPTH = 8
ERROR = "ERROR"
_TOP = "__top_llm_span_id"
_CURSOR = "__ancestor"
_TOKEN_PREFIX = "__token_"
_DETACHED_PREFIX = "__detached_"
_INNER_PREFIX = "__inner_"


def attach_token_ids(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Fill LLM rows' token columns from ``token_ids`` rows of the same call: the same trace and response
    id, or else a ``token_ids`` span that started a trace of its own with the call's response id.

    Reads ``span_type``, ``trace_id``, ``parent_span_id``, ``service_name``, ``response_id``,
    ``start_time``, ``end_time``, ``span_id``, the token columns (``prompt_token_ids``,
    ``response_token_ids``, ``response_logprobs``, ``token_ids_status``) and ``model_version``; adds
    nothing. When a retried request left several token rows for one key, the earliest-starting one is
    used. An LLM row's own ids (and version) win; its ``token_ids_status`` is replaced by the token
    row's (the LLM row says ``not_captured`` when only the sibling token span saw the call). Row order
    is kept.

    A token span lands in a trace of its own when the LLM span around its call was not the current
    OpenTelemetry span (OpenInference's LangChain instrumentation keeps its own context); it is joined
    by response id within the service only when exactly one such span has that id and it ran within
    the LLM span's time, so a server that repeats response ids never lends one call another's tokens.
    """
    is_tokens = (pl.col("span_type") == sc.TYPE_TOKEN_IDS) & pl.col("response_id").is_not_null()
    token_values = [pl.col(c).alias(_TOKEN_PREFIX + c) for c in TOKEN_SPAN_COLUMNS]
    same_trace = (
        spans.filter(is_tokens)
        .sort(["trace_id", "response_id", "start_time", "span_id"])
        .unique(subset=["trace_id", "response_id"], keep="first", maintain_order=True)
        .select("trace_id", "response_id", *token_values)
    )
    detached = (
        spans.filter(is_tokens & pl.col("parent_span_id").is_null())
        .group_by("service_name", "response_id")
        .agg(
            *(pl.col(c).first() for c in TOKEN_SPAN_COLUMNS),
            pl.col("start_time").first().alias("__token_start"),
            pl.col("end_time").first().alias("__token_end"),
            pl.len().alias("__token_spans"),
        )
        .filter(pl.col("__token_spans") == 1)
        .select("service_name", "response_id", "__token_start", "__token_end", *token_values)
    )
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    joined = spans.join(same_trace, on=["trace_id", "response_id"], how="left", maintain_order="left")
    within = (pl.col("__token_start") >= pl.col("start_time")) & (pl.col("__token_end") <= pl.col("end_time"))
    from_detached = is_llm & pl.col(_TOKEN_PREFIX + "response_token_ids").is_null() & within
    joined = (
        joined.join(
            detached.rename({_TOKEN_PREFIX + c: _DETACHED_PREFIX + c for c in TOKEN_SPAN_COLUMNS}),
            on=["service_name", "response_id"],
            how="left",
            maintain_order="left",
        )
        .with_columns(
            pl.when(from_detached.fill_null(False))
            .then(pl.col(_DETACHED_PREFIX + c))
            .otherwise(pl.col(_TOKEN_PREFIX + c))
            .alias(_TOKEN_PREFIX + c)
            for c in TOKEN_SPAN_COLUMNS
        )
        .drop("__token_start", "__token_end", *(_DETACHED_PREFIX + c for c in TOKEN_SPAN_COLUMNS))
    )
    filled = []
    for column in TOKEN_SPAN_COLUMNS:
        other = pl.col(_TOKEN_PREFIX + column)
        take_other = is_llm & other.is_not_null()
        if column != "token_ids_status":
            take_other = take_other & pl.col(column).is_null()
        filled.append(pl.when(take_other.fill_null(False)).then(other).otherwise(pl.col(column)).alias(column))
    return joined.with_columns(filled).drop([_TOKEN_PREFIX + c for c in TOKEN_SPAN_COLUMNS])


def nested_llm_spans(spans: pl.LazyFrame, depth: int = NESTING_DEPTH) -> pl.LazyFrame:
    """LLM spans inside another LLM span: ``trace_id, span_id, __top_llm_span_id`` (the outermost one).

    The walk goes up ``depth`` parents through any span type and remembers the farthest LLM
    ancestor, so in A > B > C (all LLM) both B and C map to A. Reads ``trace_id``, ``span_id``,
    ``parent_span_id``, ``span_type``; one join per hop over these id columns only.
    """
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    tree = spans.select(
        "trace_id",
        pl.col("span_id").alias(_CURSOR),
        pl.col("parent_span_id").alias("__next"),
        is_llm.alias("__is_llm"),
    )
    frame = spans.filter(is_llm).select(
        "trace_id", "span_id", pl.col("parent_span_id").alias(_CURSOR), pl.lit(None, pl.String).alias(_TOP)
    )
    for _ in range(depth):
        frame = (
            frame.join(tree, on=["trace_id", _CURSOR], how="left")
            .with_columns(
                pl.when(pl.col("__is_llm").fill_null(False)).then(pl.col(_CURSOR)).otherwise(pl.col(_TOP)).alias(_TOP)
            )
            .with_columns(pl.col("__next").alias(_CURSOR))
            .drop("__next", "__is_llm")
        )
    return frame.filter(pl.col(_TOP).is_not_null()).drop(_CURSOR)


def _first_present(column: str) -> pl.Expr:
    """The first non-null ``column`` of a group whose rows are in start order."""
    return pl.col(column).drop_nulls().first()


def _inner_values(spans: pl.LazyFrame, nested: pl.LazyFrame) -> pl.LazyFrame:
    """Per outermost call: the call columns, token group and first error of its nested spans.

    Keyed ``trace_id, span_id`` (the outermost span); value columns prefixed ``__inner_``. Token
    columns come together from the earliest nested span with response token ids.
    """
    inner = spans.join(nested, on=["trace_id", "span_id"], how="inner").sort(
        ["trace_id", _TOP, "start_time", "span_id"]
    )
    has_ids = pl.col("response_token_ids").is_not_null()
    is_error = pl.col("status_code") == ERROR
    return (
        inner.group_by("trace_id", _TOP)
        .agg(
            *(_first_present(c).alias(_INNER_PREFIX + c) for c in CALL_COLUMNS),
            *(
                pl.col(c).filter(has_ids).first().alias(_INNER_PREFIX + c)
                for c in TOKEN_COLUMNS
                if c != "token_ids_status"
            ),
            pl.coalesce(pl.col("token_ids_status").filter(has_ids).first(), _first_present("token_ids_status")).alias(
                _INNER_PREFIX + "token_ids_status"
            ),
            is_error.any().alias("__inner_error"),
            pl.col("status_message").filter(is_error).first().alias("__inner_error_message"),
        )
        .rename({_TOP: "span_id"})
    )


def merge_nested_llm_spans(spans: pl.LazyFrame, depth: int = NESTING_DEPTH) -> pl.LazyFrame:
    """``spans`` with every nest of LLM spans merged into its outermost span: one row per LLM call.

    The outermost span keeps its identity, times, names, agent and attributes; each column of
    :data:`CALL_COLUMNS` is the first value a nested span has (in start order), else its own; the
    token columns come as a group from the first nested span with
    response token ids unless the outer span has its own. The call is ``ERROR`` when any span of the
    nest is (with the first error's message). Nested spans are removed and their children re-parented
    to the outermost span, so no span is orphaned. Same columns as ``spans``; reads
    ``trace_id``, ``span_id``, ``parent_span_id``, ``span_type``, ``start_time``, ``status_code``,
    ``status_message`` and the call and token columns. Collects the map of nested span ids (small)
    and returns ``spans`` untouched when there is none.
    """
    nested = nested_llm_spans(spans, depth).collect()
    if nested.height == 0:
        return spans
    nested_lazy = nested.lazy()
    columns = spans.collect_schema().names()
    outer_has_ids = pl.col("response_token_ids").is_not_null()
    merged = [pl.coalesce(_INNER_PREFIX + c, c).alias(c) for c in CALL_COLUMNS] + [
        pl.when(outer_has_ids).then(pl.col(c)).otherwise(pl.coalesce(_INNER_PREFIX + c, c)).alias(c)
        for c in TOKEN_COLUMNS
    ]
    inner_error = pl.col("__inner_error").fill_null(False)
    outer_error = pl.col("status_code") == ERROR
    status = [
        pl.when(inner_error).then(pl.lit(ERROR)).otherwise(pl.col("status_code")).alias("status_code"),
        pl.when(inner_error & ~outer_error.fill_null(False))
        .then(pl.col("__inner_error_message"))
        .otherwise(pl.col("status_message"))
        .alias("status_message"),
    ]
    reparent = nested_lazy.select(
        "trace_id", pl.col("span_id").alias("parent_span_id"), pl.col(_TOP).alias("__new_parent")
    )
    return (
        spans.join(nested_lazy, on=["trace_id", "span_id"], how="anti", maintain_order="left")
        .join(_inner_values(spans, nested_lazy), on=["trace_id", "span_id"], how="left", maintain_order="left")
        .with_columns(*merged, *status)
        .join(reparent, on=["trace_id", "parent_span_id"], how="left", maintain_order="left")
        .with_columns(pl.coalesce("__new_parent", "parent_span_id").alias("parent_span_id"))
        .select(columns)
    )


def inherit_agent_names(spans: pl.LazyFrame, depth: int = AGENT_DEPTH) -> pl.LazyFrame:
    """``spans`` with each LLM call that has no ``agent_name`` given its nearest named ancestor's.

    Capture names a call after its ancestors when it starts, for the conventions it knows; an
    ancestor named only by normalization (an OpenInference AGENT span, spans sent over OTLP by
    another SDK) leaves its calls unnamed until here. Walks up to ``depth`` parents over the id
    columns (collected, small); returns ``spans`` untouched when every call has a name.
    """
    unnamed = (
        spans.filter((pl.col("span_type") == sc.TYPE_LLM) & pl.col("agent_name").is_null())
        .select(
            "trace_id", "span_id", pl.col("parent_span_id").alias(_CURSOR), pl.lit(None, pl.String).alias("__agent")
        )
        .collect()
    )
    if unnamed.height == 0:
        return spans
    tree = spans.select(
        "trace_id", pl.col("span_id").alias(_CURSOR), pl.col("parent_span_id").alias("__next"), "agent_name"
    )
    frame = unnamed.lazy()
    for _ in range(depth):
        frame = (
            frame.join(tree, on=["trace_id", _CURSOR], how="left")
            .with_columns(pl.coalesce("__agent", "agent_name").alias("__agent"), pl.col("__next").alias(_CURSOR))
            .drop("__next", "agent_name")
        )
    named = frame.filter(pl.col("__agent").is_not_null()).select("trace_id", "span_id", "__agent").collect()
    if named.height == 0:
        return spans
    return (
        spans.join(named.lazy(), on=["trace_id", "span_id"], how="left", maintain_order="left")
        .with_columns(pl.coalesce("agent_name", "__agent").alias("agent_name"))
        .drop("__agent")
    )
