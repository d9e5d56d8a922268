"""Spans + rollouts -> transitions: one row per chosen LLM call, the training unit of the pipeline.

A transition is one LLM call: state = the prompt messages and prompt token ids, action = the response
messages, response token ids and their logprobs. Calls are chosen by ``select`` (agent name regex,
operation names), numbered within their rollout by call order, and counted once: the spans are
prepared first (``tracelearn.pipelines.prepared``: token ids joined, an LLM span nested inside
another merged into one call), and retries recorded with the same response id are one call.

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

from tracelearn.pipelines.prepared import ensure_prepared
from tracelearn.pipelines.rollouts import ERROR
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.migrations import conform
from tracelearn.schemas.tables import TRANSITIONS

TRANSITION_COLUMNS = tuple(TRANSITIONS.schema.names)
TOKEN_IDS_SERVER = "server"
# Per-call pieces of a merged sequence and the column they are concatenated into.
_PIECES = {"__ids": "response_token_ids", "__logprobs": "response_logprobs", "__mask": "loss_mask"}
# How a call was sampled: a merged sequence holds calls that agree on all of them.
SAMPLING_COLUMNS = ("temperature", "top_p", "top_k", "model_version")


def select_llm_calls(
    spans: pl.LazyFrame,
    agent: str | None = None,
    llm_call: str | list[str] | None = None,
) -> pl.LazyFrame:
    """The LLM calls chosen for training, each once. Same columns as ``spans``, sorted by call order.

    ``spans`` are prepared (``tracelearn.pipelines.prepared``) or raw (prepared here, which merges
    nested LLM spans into one call). Reads ``span_type``, ``agent_name`` (``agent`` is a regex that
    must match the whole name; spans without an agent name never match a given regex),
    ``operation_name`` (``llm_call``: one or more operation names), ``rollout_id``,
    ``response_id``, ``status_code``, ``start_time``, ``end_time``, ``span_id``. Raises
    ``ValueError`` naming the pattern when ``agent`` is not a valid regular expression.

    Retries recorded with the same ``(rollout_id, response_id)`` count once: the earliest-ending
    successful (status not ERROR) span is kept. Spans with a null response id are never merged.
    """
    calls = ensure_prepared(spans).filter(pl.col("span_type") == sc.TYPE_LLM)
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

    ``spans`` are prepared or raw (see :func:`select_llm_calls`). Reads the spans columns used by
    :func:`select_llm_calls` plus ``request_model``, ``response_model``, ``input_messages``,
    ``output_messages``, the token columns, the sampling parameters (``request_temperature``,
    ``request_top_p``, ``request_top_k``, as ``temperature``, ``top_p``, ``top_k``) and
    ``model_version``; reads the rollouts
    columns ``rollout_id``, ``attempt_id``, ``task_id``, ``group_id``, ``rewards``, ``final_reward``.
    Only rollouts present in ``rollouts`` yield transitions (so the watermark and missing-reward
    policies of the rollout build carry over). ``step_index`` numbers the calls of a rollout from 0 by
    start time (ties by span id). ``credited_reward``, ``advantage`` and ``loss_mask`` are null (set by
    the credit, advantage and trajectory stages). ``token_ids_source`` is ``server`` when the call has
    response token ids, else null.
    """
    calls = select_llm_calls(spans, agent=agent, llm_call=llm_call)
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
            pl.col("request_temperature").alias("temperature"),
            pl.col("request_top_p").alias("top_p"),
            pl.col("request_top_k").alias("top_k"),
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
    ``prompt_{k+1}``, and both were sampled alike: the same ``temperature``, ``top_p``, ``top_k`` and
    ``model_version`` (nulls equal), since the trainer computes a row's logprobs with one temperature
    and weighs it by one version (a call sampled otherwise starts a row of its own). A run of such
    calls becomes one row: ``prompt_token_ids`` of the first call;
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
    sampled_alike = pl.all_horizontal(
        pl.col(c).eq_missing(pl.col(c).shift(1).over(group, order_by="step_index")) for c in SAMPLING_COLUMNS
    )
    continues = (
        has_ids
        & sampled_alike
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
