"""Which spans make one rollout, without code change in the agent.

Rules, in order (the rollouts table's ``identity`` column says which one made each rollout):

1. ``explicit``: spans carrying a rollout id from ``tracelearn.rollout()`` or baggage (their
   ``rollout_id`` differs from their trace id) belong to that rollout, across traces and processes.
2. ``trace``: a trace whose root span is not an LLM call (the agent's own span, a framework's run
   span) is one rollout.
3. ``conversation``: the rest are *loose* calls: traces whose root is an LLM call and which hold
   nothing but LLM calls, token-id spans and HTTP client spans (an agent that opens no span of its
   own: the plain OpenAI SDK, the Agents SDK without its instrumentor, smolagents, uninstrumented
   Pydantic AI). A loose call whose input messages begin with an earlier call's input plus output
   (the same conversation carried on, as every tool loop does) joins that call's rollout, within
   one service and ``window`` of the earlier call's end. Messages are compared canonically: role,
   text (trimmed), tool-call names and arguments (whitespace dropped) and ``tool_call_id``. When
   several earlier calls match equally (two runs of the same task at once), a call pairs first
   with calls of its own process and thread, then with any, one to one, the most recent first.
4. ``sequence``: a loose call that continued no conversation but carries history (an assistant
   message in its input), some frameworks having rewritten the prompt in between (smolagents'
   final-answer step replaces the system prompt), joins the call that ended last before it in the
   same process and thread with the same first user message, if that ended at most ``gap``
   before it. Process and thread come from the ``process.pid`` and ``thread.id`` attributes that
   tracelearn's span processor puts on every span.

A loose call joined to nothing is a rollout of its own (``conversation``). A joined rollout's id
is the trace id of its first call, so its task id (``rollouts.rollout_task_ids``) comes from the
first call too. Everything is polars expressions; Python only loops until the chains of links are
resolved (pointer jumping: a few rounds), over the small frame of loose calls.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson
import polars as pl

from tracelearn.pipelines.llm_calls import merge_nested_llm_spans
from tracelearn.schemas import semconv as sc

__all__ = [
    "IDENTITIES",
    "IDENTITY_MAP_SCHEMA",
    "JoinConfig",
    "apply_rollout_identity",
    "canonical_message_hashes",
    "loose_traces",
    "rollout_identity_map",
]

EXPLICIT, TRACE, CONVERSATION, SEQUENCE = "explicit", "trace", "conversation", "sequence"
IDENTITIES = (EXPLICIT, TRACE, CONVERSATION, SEQUENCE)
IDENTITY_MAP_SCHEMA = {"trace_id": pl.String, "rollout_id": pl.String, "rollout_identity": pl.String}
MESSAGE_DTYPE = pl.Struct(
    {
        "role": pl.String,
        "content": pl.String,
        "tool_call_id": pl.String,
        "tool_calls": pl.List(pl.Struct({"function": pl.Struct({"name": pl.String, "arguments": pl.String})})),
    }
)
MESSAGES_DTYPE = pl.List(MESSAGE_DTYPE)
_SEED = 0x7ACE1EA2
_CALL = ["service_name", "pid", "thread"]


@dataclass(frozen=True)
class JoinConfig:
    """How loose calls join: ``window`` after an earlier call's end for a conversation to carry on,
    ``gap`` between one call's end and the next one's start for the sequence rule."""

    window: dt.timedelta = dt.timedelta(minutes=10)
    gap: dt.timedelta = dt.timedelta(seconds=30)


def loose_traces(spans: pl.LazyFrame) -> pl.LazyFrame:
    """``trace_id`` of every trace made only of a root LLM call (and LLM, token-id, HTTP client spans),
    with no explicit rollout id. Reads ``trace_id``, ``parent_span_id``, ``span_type``, ``kind``,
    ``rollout_id``."""
    span_type = pl.col("span_type")
    allowed = span_type.is_in([sc.TYPE_LLM, sc.TYPE_TOKEN_IDS]) | (
        (span_type == sc.TYPE_OTHER) & (pl.col("kind") == "CLIENT")
    )
    root_call = pl.col("parent_span_id").is_null() & (span_type == sc.TYPE_LLM)
    return (
        spans.group_by("trace_id")
        .agg(
            root_call.any().alias("__root_call"),
            allowed.fill_null(False).all().alias("__allowed"),
            (pl.col("rollout_id") == pl.col("trace_id")).fill_null(True).all().alias("__implicit"),
        )
        .filter(pl.col("__root_call") & pl.col("__allowed") & pl.col("__implicit"))
        .select("trace_id")
    )


def _text(value: Any) -> str | None:
    """A message field as text: strings as they are, a parts list as its text parts, the rest as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(part.get("text", "")) for part in value if isinstance(part, dict))
    return orjson.dumps(value).decode()


def _lenient_message(message: Any) -> dict[str, Any] | None:
    """One decoded message in ``MESSAGE_DTYPE``'s shape whatever its fields hold; ``None`` if not an object."""
    if not isinstance(message, dict):
        return None
    raw_calls = message.get("tool_calls")
    calls: list[Any] = raw_calls if isinstance(raw_calls, list) else []
    functions: list[dict[str, Any]] = [
        call["function"] for call in calls if isinstance(call, dict) and isinstance(call.get("function"), dict)
    ]
    return {
        "role": str(message.get("role")),
        "content": _text(message.get("content")),
        "tool_call_id": _text(message.get("tool_call_id")),
        "tool_calls": [
            {"function": {"name": _text(function.get("name")), "arguments": _text(function.get("arguments"))}}
            for function in functions
        ],
    }


def _lenient_messages(text: str | None) -> list[dict[str, Any]] | None:
    try:
        messages = orjson.loads(text) if text is not None else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(messages, list):
        return None
    return [m for m in map(_lenient_message, messages) if m is not None]


def decode_messages(texts: pl.Series) -> pl.Series:
    """Messages JSON text as ``MESSAGES_DTYPE`` lists; malformed text becomes null, never an error.

    The codec writes one shape, decoded in one vectorized pass; a batch holding anything else (a
    content parts list, a non-JSON value) is decoded row by row, leniently.
    """
    try:
        return texts.str.json_decode(MESSAGES_DTYPE)
    except pl.exceptions.PolarsError:
        return pl.Series(texts.name, [_lenient_messages(t) for t in texts], dtype=MESSAGES_DTYPE)


def _canonical_hash(message: pl.Expr) -> pl.Expr:
    """UInt64 hash of a message's role, trimmed text, tool-call names/arguments and tool_call_id."""
    function = pl.element().struct.field("function")
    call = pl.concat_str(
        function.struct.field("name").fill_null(""),
        pl.lit("\x1f"),
        function.struct.field("arguments").fill_null("").str.replace_all(r"\s", ""),
    )
    calls = message.struct.field("tool_calls").list.eval(call).list.join("\x1e").fill_null("")
    return pl.struct(
        message.struct.field("role").fill_null(""),
        message.struct.field("content").fill_null("").str.strip_chars(),
        message.struct.field("tool_call_id").fill_null(""),
        calls.alias("calls"),
    ).hash(_SEED)


def canonical_message_hashes(calls: pl.DataFrame) -> pl.DataFrame:
    """One row per message of each call (input, then output): ``call, position, is_output, role,
    content, message_hash, prefix_key``.

    ``prefix_key`` identifies the messages up to and including this one: a wrapping sum over the
    call's messages of each message's hash salted with its position, so two calls share a prefix
    key exactly when (up to hash collisions) their first ``position + 1`` messages are equal.
    Reads ``call``, ``input_messages``, ``output_messages`` (JSON text).
    """
    decoded = calls.select(
        "call",
        pl.col("input_messages").map_batches(decode_messages, return_dtype=MESSAGES_DTYPE).alias("__in"),
        pl.col("output_messages").map_batches(decode_messages, return_dtype=MESSAGES_DTYPE).alias("__out"),
    )
    # Exploded apart and stacked (inputs first, so positions run on into the output): concatenating
    # the two lists per row first costs ten times more.
    sides = [
        decoded.select("call", pl.col(side).alias("__message"), pl.lit(is_output).alias("is_output")).explode(
            "__message", keep_nulls=False, empty_as_null=False
        )
        for side, is_output in (("__in", False), ("__out", True))
    ]
    messages = (
        pl.concat(sides)
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("call").alias("position"))
        .with_columns(_canonical_hash(pl.col("__message")).alias("message_hash"))
    )
    salted = pl.struct("message_hash", "position").hash(_SEED).cast(pl.UInt64)
    return messages.select(
        "call",
        "position",
        "is_output",
        pl.col("__message").struct.field("role").alias("role"),
        pl.col("__message").struct.field("content").fill_null("").str.strip_chars().alias("content"),
        "message_hash",
        salted.cum_sum().over("call", order_by="position").alias("prefix_key"),
    )


def _loose_calls(spans: pl.LazyFrame) -> pl.DataFrame:
    """The root call of every loose trace: ``call`` (= trace id), service, pid, thread, times, messages."""
    loose = loose_traces(spans)
    merged = merge_nested_llm_spans(spans.join(loose, on="trace_id", how="semi"))
    attributes = pl.col("attributes")
    return (
        merged.filter(pl.col("parent_span_id").is_null() & (pl.col("span_type") == sc.TYPE_LLM))
        .sort("trace_id", "start_time", "span_id")
        .unique(subset=["trace_id"], keep="first", maintain_order=True)
        .select(
            pl.col("trace_id").alias("call"),
            pl.col("service_name").fill_null(""),
            attributes.map.get(sc.PROCESS_PID).alias("pid"),
            attributes.map.get(sc.THREAD_ID).alias("thread"),
            "start_time",
            "end_time",
            "input_messages",
            "output_messages",
        )
        .collect()
    )


def _pair(later: pl.DataFrame, earlier: pl.DataFrame, by: list[str], window: dt.timedelta) -> pl.DataFrame:
    """One-to-one links ``call -> previous`` from ``later`` calls to ``earlier`` ones with equal ``by``.

    Both frames hold ``call``, ``by`` and a time (``later.start_time``, ``earlier.end_time``). Events
    of one ``by`` group are walked in time: an earlier call opens a slot, a later call takes the most
    recently opened slot still free (a stack, as matching parentheses: the depth of the stack before
    the later call finds, by an as-of join, the call that opened that depth last). A link is kept
    when the earlier call ended at most ``window`` before the later one started.
    """
    opened = earlier.select("call", *by, pl.col("end_time").alias("__at"), pl.lit(1, pl.Int64).alias("__step"))
    taken = later.select("call", *by, pl.col("start_time").alias("__at"), pl.lit(-1, pl.Int64).alias("__step"))
    events = (
        pl.concat([opened, taken])
        .sort([*by, "__at", pl.col("__step").neg(), "call"], nulls_last=True)
        .with_columns(pl.col("__step").cum_sum().over(by).alias("__depth"))
    )
    slots = events.filter(pl.col("__step") == 1).select(pl.col("call").alias("previous"), *by, "__depth", "__at")
    wanted = events.filter(pl.col("__step") == -1).with_columns((pl.col("__depth") + 1).alias("__depth"))
    linked = wanted.sort("__at", "call").join_asof(
        slots.sort("__at", "previous").rename({"__at": "__ended"}),
        left_on="__at",
        right_on="__ended",
        by=[*by, "__depth"],
        strategy="backward",
        check_sortedness=False,
    )
    fresh = (pl.col("__at") - pl.col("__ended")) <= window
    return linked.filter(pl.col("previous").is_not_null() & fresh).select("call", "previous")


def _conversation_links(calls: pl.DataFrame, messages: pl.DataFrame, window: dt.timedelta) -> pl.DataFrame:
    """``call, previous``: each call that carries on an earlier call's conversation, and that call."""
    ends = messages.group_by("call").agg(pl.col("prefix_key").last().alias("key"), pl.col("is_output").any())
    keys = ends.filter("is_output").select("call", "key").join(calls, on="call")
    prefixes = messages.filter(~pl.col("is_output")).select("call", "position", pl.col("prefix_key").alias("key"))
    candidates = (
        prefixes.join(calls, on="call")
        .join(
            keys.select("key", "service_name", pl.col("call").alias("__a"), pl.col("start_time").alias("__a_start")),
            on=["key", "service_name"],
        )
        .filter((pl.col("__a") != pl.col("call")) & (pl.col("__a_start") < pl.col("start_time")))
    )
    longest = candidates.sort("position", descending=True).unique(subset=["call"], keep="first").select("call", "key")
    later = longest.join(calls, on="call")
    same_thread = [*_CALL, "key"]
    known = pl.col("pid").is_not_null() & pl.col("thread").is_not_null()
    first = _pair(later.filter(known), keys.filter(known), same_thread, window)
    rest = later.join(first, on="call", how="anti")
    free = keys.join(first.select(pl.col("previous").alias("call")), on="call", how="anti")
    second = _pair(rest, free, ["service_name", "key"], window)
    # More later calls than earlier ones with their key (one state carried on twice): the rest join
    # the most recent earlier call with that key.
    unpaired = rest.join(second, on="call", how="anti").sort("start_time", "call")
    fan_out = unpaired.join_asof(
        keys.select("service_name", "key", pl.col("call").alias("previous"), pl.col("end_time").alias("__ended")).sort(
            "__ended", "previous"
        ),
        left_on="start_time",
        right_on="__ended",
        by=["service_name", "key"],
        strategy="backward",
        check_sortedness=False,
    ).filter(pl.col("previous").is_not_null() & ((pl.col("start_time") - pl.col("__ended")) <= window))
    return pl.concat([first, second, fan_out.select("call", "previous")])


def _sequence_links(
    calls: pl.DataFrame, messages: pl.DataFrame, joined: pl.DataFrame, gap: dt.timedelta
) -> pl.DataFrame:
    """``call, previous``: a call with history that continued no conversation, and the call that ended
    last before it in its process and thread with the same first user message (at most ``gap`` before)."""
    inputs = messages.filter(~pl.col("is_output"))
    first_user = (
        inputs.filter(pl.col("role") == "user")
        .group_by("call")
        .agg(pl.col("content").sort_by("position").first().alias("first_user"))
    )
    with_history = inputs.filter(pl.col("role") == "assistant").select("call").unique()
    known = calls.filter(pl.col("pid").is_not_null() & pl.col("thread").is_not_null()).join(first_user, on="call")
    by = [*_CALL, "first_user"]
    later = (
        known.join(with_history, on="call", how="semi").join(joined, on="call", how="anti").sort("start_time", "call")
    )
    earlier = known.select(
        pl.col("call").alias("previous"),
        *by,
        pl.col("end_time").alias("__ended"),
        pl.col("start_time").alias("__started"),
    )
    linked = later.join_asof(
        earlier.sort("__ended", "previous"),
        left_on="start_time",
        right_on="__ended",
        by=by,
        strategy="backward",
        check_sortedness=False,
    )
    close = (pl.col("start_time") - pl.col("__ended")) <= gap
    return linked.filter(
        pl.col("previous").is_not_null()
        & (pl.col("previous") != pl.col("call"))
        & (pl.col("__started") < pl.col("start_time"))
        & close
    ).select("call", "previous")


def _first_calls(links: pl.DataFrame) -> pl.DataFrame:
    """``call, first``: follows ``call -> previous`` links to the chain's first call (pointer jumping)."""
    chain = links.select("call", pl.col("previous").alias("first")).sort("call")
    while True:
        step = (
            chain.join(chain.rename({"call": "first", "first": "__next"}), on="first", how="left")
            .select("call", pl.coalesce("__next", "first").alias("first"))
            .sort("call")
        )
        if step.equals(chain):
            return chain
        chain = step


def rollout_identity_map(spans: pl.LazyFrame, config: JoinConfig | None = None) -> pl.DataFrame:
    """``trace_id, rollout_id, rollout_identity`` for every loose trace (rules 3 and 4 above).

    ``spans``: one row per span (de-duplicated), nested LLM spans merged or not. Reads
    ``trace_id``, ``span_id``, ``parent_span_id``, ``span_type``, ``kind``, ``rollout_id``,
    ``service_name``, ``attributes``, ``start_time``, ``end_time``, ``status_code``,
    ``status_message``, the call and token columns; only the loose traces' calls are collected.
    """
    config = config or JoinConfig()
    calls = _loose_calls(spans)
    if calls.height == 0:
        return pl.DataFrame(schema=IDENTITY_MAP_SCHEMA)
    messages = canonical_message_hashes(calls)
    conversation = _conversation_links(calls, messages, config.window)
    sequence = _sequence_links(calls, messages, conversation.select("call"), config.gap)
    links = pl.concat([conversation, sequence])
    first = _first_calls(links)
    by_sequence = first.join(sequence.select("call"), on="call", how="semi").select("first").unique()
    return (
        calls.select("call")
        .join(first, on="call", how="left")
        .with_columns(pl.coalesce("first", "call").alias("first"))
        .with_columns(pl.col("first").is_in(by_sequence.get_column("first").implode()).alias("__sequence"))
        .select(
            pl.col("call").alias("trace_id"),
            pl.col("first").alias("rollout_id"),
            pl.when("__sequence").then(pl.lit(SEQUENCE)).otherwise(pl.lit(CONVERSATION)).alias("rollout_identity"),
        )
        .sort("trace_id")
    )


def apply_rollout_identity(spans: pl.LazyFrame, identity: pl.DataFrame) -> pl.LazyFrame:
    """``spans`` with loose traces' ``rollout_id`` replaced per ``identity`` (a :func:`rollout_identity_map`)
    and ``rollout_identity`` added to every span: ``explicit``, ``trace`` or the map's rule."""
    own = pl.when(pl.col("rollout_id") != pl.col("trace_id")).then(pl.lit(EXPLICIT)).otherwise(pl.lit(TRACE))
    if identity.height == 0:
        return spans.with_columns(own.alias("rollout_identity"))
    mapped = identity.lazy().rename({"rollout_id": "__rollout_id", "rollout_identity": "__identity"})
    return (
        spans.join(mapped, on="trace_id", how="left", maintain_order="left")
        .with_columns(
            pl.coalesce("__rollout_id", "rollout_id").alias("rollout_id"),
            pl.coalesce(pl.col("__identity"), own).alias("rollout_identity"),
        )
        .drop("__rollout_id", "__identity")
    )
