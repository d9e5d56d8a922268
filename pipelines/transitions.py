"""Spans + rollouts -> transitions: one row per chosen LLM call, the training unit of the pipeline.

A transition is one LLM call: state = the prompt messages and prompt token ids, action = the response
messages, response token ids and their logprobs. Calls are chosen by ``select`` (agent name regex,
operation names), numbered within their rollout by call order, and counted once: an LLM span nested
inside another LLM span (an SDK span under a framework span) and retries recorded with the same
response id are duplicates of one call.

Token ids are never re-tokenized here: a call without server token ids keeps null ids and
``token_ids_source`` null (``transition_counts`` counts them); a later stage may retokenize.

``merge_trajectories`` optionally turns a multi-turn agent's consecutive calls into one sequence with
a loss mask, when each call's prompt+response ids are an exact prefix of the next call's prompt.
Everything is polars expressions over LazyFrames, no Python loop over rows (the merge works with
window expressions over ``(rollout_id, agent_name)``, no UDF).
"""

import re

import polars as pl
import pyarrow as pa

from tracelearn.pipelines.rollouts import ERROR
from tracelearn.pipelines.spans_input import distinct_spans
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.migrations import conform
from tracelearn.schemas.tables import TRANSITIONS

TRANSITION_COLUMNS = tuple(TRANSITIONS.schema.names)
TOKEN_COLUMNS = ("prompt_token_ids", "response_token_ids", "response_logprobs", "token_ids_status")
TOKEN_IDS_SERVER = "server"
# How many ancestors of an LLM span are walked to find an enclosing LLM span (through agent, chain
# or HTTP spans in between). Deeper nesting is not detected; the retry de-duplication by response id
# still merges such a call when both spans carry the same response id.
NESTING_DEPTH = 4
_OUTER = "__outer_llm_span_id"
_CURSOR = "__ancestor"
_TOKEN_PREFIX = "__token_"
_NESTED_PREFIX = "__nested_"
# Per-call pieces of a merged sequence and the column they are concatenated into.
_PIECES = {"__ids": "response_token_ids", "__logprobs": "response_logprobs", "__mask": "loss_mask"}


def attach_token_ids(spans: pl.LazyFrame) -> pl.LazyFrame:
    """Fill LLM rows' token columns from ``token_ids`` rows of the same trace and response id.

    The polars twin of ``tracelearn.collector.token_join.attach_token_ids``. Reads ``span_type``,
    ``trace_id``, ``response_id``, ``start_time``, ``span_id`` and the token columns
    (``prompt_token_ids``, ``response_token_ids``, ``response_logprobs``, ``token_ids_status``); adds
    nothing. When a retried request left several token rows for one key, the earliest-starting one
    is used. An LLM row's own ids win; its ``token_ids_status`` is replaced by the token row's (the
    LLM row says ``not_captured`` when only the sibling token span saw the call). Row order is kept.
    """
    tokens = (
        spans.filter((pl.col("span_type") == sc.TYPE_TOKEN_IDS) & pl.col("response_id").is_not_null())
        .sort(["trace_id", "response_id", "start_time", "span_id"])
        .unique(subset=["trace_id", "response_id"], keep="first", maintain_order=True)
        .select("trace_id", "response_id", *(pl.col(c).alias(_TOKEN_PREFIX + c) for c in TOKEN_COLUMNS))
    )
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    filled = []
    for column in TOKEN_COLUMNS:
        other = pl.col(_TOKEN_PREFIX + column)
        take_other = is_llm & other.is_not_null()
        if column != "token_ids_status":
            take_other = take_other & pl.col(column).is_null()
        filled.append(pl.when(take_other.fill_null(False)).then(other).otherwise(pl.col(column)).alias(column))
    return (
        spans.join(tokens, on=["trace_id", "response_id"], how="left", maintain_order="left")
        .with_columns(filled)
        .drop([_TOKEN_PREFIX + c for c in TOKEN_COLUMNS])
    )


def outer_llm_spans(spans: pl.LazyFrame, depth: int = NESTING_DEPTH) -> pl.LazyFrame:
    """Per LLM span: ``trace_id, span_id, __outer_llm_span_id``, its nearest LLM ancestor within ``depth`` parents.

    Reads ``trace_id``, ``span_id``, ``parent_span_id``, ``span_type``. Null when no ancestor within
    ``depth`` hops is an LLM span (or the parent chain leaves the dataset). One join per hop, over
    the four id columns only: the wide message and token columns never go through the walk.
    """
    is_llm = pl.col("span_type") == sc.TYPE_LLM
    tree = spans.select(
        "trace_id",
        pl.col("span_id").alias(_CURSOR),
        pl.col("parent_span_id").alias("__next"),
        is_llm.alias("__is_llm"),
    )
    frame = spans.filter(is_llm).select(
        "trace_id", "span_id", pl.col("parent_span_id").alias(_CURSOR), pl.lit(None, pl.String).alias(_OUTER)
    )
    for _ in range(depth):
        frame = (
            frame.join(tree, on=["trace_id", _CURSOR], how="left")
            .with_columns(
                pl.when(pl.col(_OUTER).is_null() & pl.col("__is_llm").fill_null(False))
                .then(pl.col(_CURSOR))
                .otherwise(pl.col(_OUTER))
                .alias(_OUTER)
            )
            .with_columns(pl.col("__next").alias(_CURSOR))
            .drop("__next", "__is_llm")
        )
    return frame.drop(_CURSOR)


def select_llm_calls(
    spans: pl.LazyFrame,
    agent: str | None = None,
    llm_call: str | list[str] | None = None,
) -> pl.LazyFrame:
    """The LLM spans chosen for training, each call once. Same columns as ``spans``, sorted by call order.

    Reads ``span_type``, ``agent_name`` (``agent`` is a regex that must match the whole name; spans
    without an agent name never match a given regex), ``operation_name`` (``llm_call``: one or more
    operation names), ``trace_id``, ``span_id``, ``parent_span_id``, ``rollout_id``, ``response_id``,
    ``status_code``, ``start_time``, ``end_time`` and the token columns. Raises ``ValueError`` naming
    the pattern when ``agent`` is not a valid regular expression.

    Counted once:
    - an LLM span with an LLM ancestor within :data:`NESTING_DEPTH` parents in the same trace is the
      same call seen by two instrumentations; it is dropped, and when the outer span has no response
      token ids it takes the token columns of its earliest nested call that has them;
    - retries recorded with the same ``(rollout_id, response_id)``: the earliest-ending successful
      (status not ERROR) span is kept. Spans with a null response id are never merged.
    """
    spans = distinct_spans(spans)
    llm = spans.filter(pl.col("span_type") == sc.TYPE_LLM).join(
        outer_llm_spans(spans), on=["trace_id", "span_id"], how="left", maintain_order="left"
    )
    nested_tokens = (
        llm.filter(pl.col(_OUTER).is_not_null() & pl.col("response_token_ids").is_not_null())
        .sort(["trace_id", _OUTER, "start_time", "span_id"])
        .unique(subset=["trace_id", _OUTER], keep="first", maintain_order=True)
        .select(
            "trace_id",
            pl.col(_OUTER).alias("span_id"),
            *(pl.col(c).alias(_NESTED_PREFIX + c) for c in TOKEN_COLUMNS),
        )
    )
    take_nested = pl.col("response_token_ids").is_null() & pl.col(_NESTED_PREFIX + "response_token_ids").is_not_null()
    calls = (
        llm.filter(pl.col(_OUTER).is_null())
        .join(nested_tokens, on=["trace_id", "span_id"], how="left")
        .with_columns(
            pl.when(take_nested).then(pl.col(_NESTED_PREFIX + c)).otherwise(pl.col(c)).alias(c) for c in TOKEN_COLUMNS
        )
        .drop(_OUTER, *(_NESTED_PREFIX + c for c in TOKEN_COLUMNS))
    )
    if agent is not None:
        try:
            re.compile(agent)  # fail here, naming the pattern, rather than deep inside the query
        except re.error as error:
            raise ValueError(f"select.agent {agent!r} is not a valid regular expression: {error}") from None
        calls = calls.filter(pl.col("agent_name").str.contains(f"^(?:{agent})$").fill_null(False))
    if llm_call is not None:
        operations = [llm_call] if isinstance(llm_call, str) else list(llm_call)
        calls = calls.filter(pl.col("operation_name").is_in(operations).fill_null(False))
    first_of_response = pl.int_range(pl.len()).over(["rollout_id", "response_id"]) == 0
    return (
        calls.sort(
            ["rollout_id", (pl.col("status_code") == ERROR).fill_null(False), "end_time", "span_id"],
        )
        .filter(pl.col("response_id").is_null() | first_of_response)
        .sort(["rollout_id", "start_time", "span_id"])
    )


def extract_transitions(
    spans: pl.LazyFrame,
    rollouts: pl.LazyFrame,
    agent: str | None = None,
    llm_call: str | list[str] | None = None,
    pipeline_config_hash: str | None = None,
) -> pl.LazyFrame:
    """One row per chosen LLM call with exactly the TRANSITIONS columns, sorted by rollout and step.

    Reads the spans columns used by :func:`attach_token_ids` and :func:`select_llm_calls` plus
    ``request_model``, ``response_model``, ``input_messages``, ``output_messages``; reads the rollouts
    columns ``rollout_id``, ``attempt_id``, ``task_id``, ``group_id``, ``rewards``, ``final_reward``.
    Only rollouts present in ``rollouts`` yield transitions (so the watermark and missing-reward
    policies of the rollout build carry over). ``step_index`` numbers the calls of a rollout from 0 by
    start time (ties by span id). ``credited_reward``, ``advantage`` and ``loss_mask`` are null (set by
    the credit, advantage and trajectory stages). ``token_ids_source`` is ``server`` when the call has
    response token ids, else null.
    """
    calls = select_llm_calls(attach_token_ids(spans), agent=agent, llm_call=llm_call)
    episode = rollouts.select(
        "rollout_id", "attempt_id", "task_id", "group_id", "rewards", pl.col("final_reward").alias("reward")
    )
    return (
        calls.with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("rollout_id").alias("step_index"))
        .drop("attempt_id", "task_id", "group_id", "reward")
        .join(episode, on="rollout_id", how="inner")
        .with_columns(
            pl.coalesce("response_model", "request_model").alias("model"),
            pl.col("input_messages").alias("prompt_messages"),
            pl.col("output_messages").alias("response"),
            pl.when(pl.col("response_token_ids").is_not_null())
            .then(pl.lit(TOKEN_IDS_SERVER))
            .otherwise(pl.lit(None, pl.String))
            .alias("token_ids_source"),
            pl.lit(None, pl.Float64).alias("credited_reward"),
            pl.lit(None, pl.Float64).alias("advantage"),
            pl.lit(None, pl.List(pl.Int8)).alias("loss_mask"),
            pl.lit(pipeline_config_hash, pl.String).alias("pipeline_config_hash"),
        )
        .select(TRANSITION_COLUMNS)
        .sort(["rollout_id", "step_index"])
    )


def merge_trajectories(transitions: pl.LazyFrame) -> pl.LazyFrame:
    """Merge consecutive calls of one agent into one sequence when each extends the previous one.

    Within ``(rollout_id, agent_name)`` in ``step_index`` order, call k+1 continues call k when both
    have prompt and response token ids and ``prompt_k + response_k`` is an exact prefix of
    ``prompt_{k+1}``. A run of such calls becomes one row: ``prompt_token_ids`` of the first call;
    ``response_token_ids`` = response_k, then the tokens in between (the observation: tool results,
    the next user turn, chat-template tokens), then response_{k+1}, and so on; ``loss_mask`` is 1 on
    generated tokens and 0 on the in-between ones; ``response_logprobs`` are aligned with 0.0 on the
    in-between tokens (masked out anyway; 0.0 rather than null keeps the tensors free of NaN), or
    null when any call of the run lacks logprobs. ``step_index``, ``prompt_messages``, ``span_id`` and
    the other columns come from the first call; ``response`` is the last call's response messages.

    Reads the TRANSITIONS columns; returns the same columns. Every row with response token ids gets a
    ``loss_mask`` (all ones when nothing was merged); rows without token ids are never merged and
    keep a null mask. Sorted by ``rollout_id``, ``step_index``.
    """
    group = ["rollout_id", "agent_name"]
    has_ids = pl.col("prompt_token_ids").is_not_null() & pl.col("response_token_ids").is_not_null()
    sequence = pl.concat_list("prompt_token_ids", "response_token_ids")
    previous = pl.when(has_ids).then(sequence).otherwise(pl.lit(None)).shift(1).over(group, order_by="step_index")
    ones = pl.lit(1, pl.Int8).repeat_by(pl.col("response_token_ids").list.len())
    observation_length = pl.col("prompt_token_ids").list.len() - pl.col("__previous").list.len()
    continues = (
        has_ids
        & (pl.col("prompt_token_ids").list.len() >= pl.col("__previous").list.len())
        & (pl.col("prompt_token_ids").list.head(pl.col("__previous").list.len()) == pl.col("__previous"))
    ).fill_null(False)
    observation = pl.col("prompt_token_ids").list.slice(pl.col("__previous").list.len())
    pieces = transitions.with_columns(previous.alias("__previous")).with_columns(
        continues.alias("__continues"),
        pl.when(continues)
        .then(pl.concat_list(observation, "response_token_ids"))
        .otherwise(pl.col("response_token_ids"))
        .alias("__ids"),
        pl.when(continues)
        .then(pl.concat_list(pl.lit(0.0, pl.Float32).repeat_by(observation_length), "response_logprobs"))
        .otherwise(pl.col("response_logprobs"))
        .alias("__logprobs"),
        pl.when(continues)
        .then(pl.concat_list(pl.lit(0, pl.Int8).repeat_by(observation_length), ones))
        .when(has_ids)
        .then(ones)
        .otherwise(pl.lit(None, pl.List(pl.Int8)))
        .alias("__mask"),
    )
    runs = pieces.sort([*group, "step_index"]).with_columns(
        (~pl.col("__continues")).cum_sum().over(group).alias("__run")
    )
    explode = {"keep_nulls": False, "empty_as_null": False}
    first_columns = [c for c in TRANSITION_COLUMNS if c not in (*group, "response", *_PIECES.values())]
    merged = (
        runs.group_by([*group, "__run"])
        .agg(
            *(pl.col(c).first() for c in first_columns),
            pl.col("response").last(),
            *(pl.col(piece).list.explode(**explode).alias(column) for piece, column in _PIECES.items()),
            *(pl.col(piece).is_null().any().alias(piece) for piece in _PIECES),
        )
        .with_columns(
            pl.when(pl.col(piece)).then(pl.lit(None)).otherwise(pl.col(column)).alias(column)
            for piece, column in _PIECES.items()
        )
    )
    return merged.select(TRANSITION_COLUMNS).sort(["rollout_id", "step_index"])


def transition_counts(transitions: pl.LazyFrame) -> dict[str, int]:
    """Counts for the build report: ``transitions``, ``rollouts``, ``without_token_ids``.

    Reads ``rollout_id`` and ``token_ids_source`` (null = no server token ids; not retokenized here).
    """
    row = (
        transitions.select(
            pl.len().alias("transitions"),
            pl.col("rollout_id").n_unique().alias("rollouts"),
            pl.col("token_ids_source").is_null().sum().alias("without_token_ids"),
        )
        .collect()
        .row(0, named=True)
    )
    return {name: int(value) for name, value in row.items()}


def transitions_to_arrow(transitions: pl.DataFrame) -> pa.Table:
    """The transitions as an Arrow table of the TRANSITIONS schema (with version metadata), ready to write."""
    rewards = transitions.schema["rewards"]
    if not isinstance(rewards, pl.Map):
        transitions = transitions.with_columns(pl.col("rewards").cast(pl.Map(pl.String, pl.Float64)))
    return conform(transitions.to_arrow(), TRANSITIONS)
