"""Transitions -> the Parquet files verl trains from: RL prompts, SFT conversations, on-policy replay.

Contracts (verl 0.9.1, the version ``tracelearn.training.verl_backend`` pins: ``RLHFDataset`` in
``verl/utils/dataset/rl_dataset.py``, ``MultiTurnSFTDataset`` in
``verl/utils/dataset/multiturn_sft_dataset.py``, the agent loop in
``verl/experimental/agent_loop/agent_loop.py`` and ``verl/trainer/ppo/v1/agent_loop_tq.py``; the
contract tests in ``tests/contracts/`` load these files with verl's own classes):

- **verl-rl** (:func:`to_verl_rl`): ``RLHFDataset`` reads ``prompt`` (its ``prompt_key``) as a chat
  list and applies the tokenizer's chat template itself, so the prompt is ``list<struct{role,
  content}>``, exactly gsm8k's shape. verl samples its own responses, so a row is a *prompt*, not a
  call: one row per distinct initial prompt (the first selected call of each rollout) per task.
  ``extra_info`` carries the provenance of the first rollout that had the prompt (by ``rollout_id``)
  plus ``n_rollouts`` and that rollout's ``reward`` and ``advantage``.
- **verl-sft** (:func:`to_verl_sft`): ``MultiTurnSFTDataset`` reads ``messages`` (its
  ``messages_key``): one row per transition, the prompt messages followed by the response messages,
  optionally only rows whose reward is at least ``min_reward`` (SFT on good traces). A Parquet column
  has one struct type, so a message field is written only when some message of the export has it
  (``tool_calls``, ``tool_call_id``, ``name``; a conversation without tools has ``role`` and
  ``content`` alone, and no chat template sees a null ``name``), and tool-call arguments are JSON
  objects as chat templates expect them (verl's own examples do the same), unless the export's
  arguments do not fit one Arrow type: then they stay JSON text (``VerlExport.notes`` says so).
- **verl-replay** (:func:`to_verl_replay`): the RL row of every transition plus one struct column,
  ``tracelearn_replay{prompt_ids, response_ids, response_mask, response_logprobs, advantage,
  temperature}``: the
  stored tokens the replay agent loop returns instead of sampling. One column under a name verl never
  uses, because verl hands every dataset column to the agent loop and (trainer V1) merges them into
  its own sample: a column named ``response_mask`` would replace verl's tensor mask. Rows without
  token ids cannot be replayed and are dropped and counted.

Known gaps, stated rather than hidden: the transitions table holds no tool definitions and no
ground truth, so no ``tools`` column is written and ``reward_model.ground_truth`` is the empty
string (the stored rewards stand in: use verl-replay, or a reward function that reads
``extra_info``).

Train/validation split: by a SHA-256 of the task id (the rollout id when there is none), so a task
never lands in both files (no leakage) and the split is the same on every run and machine. Messages
are JSON text in the transitions; a row whose JSON does not parse as OpenAI-style messages is
dropped and reported with its trace and span id.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from tracelearn.pipelines.export_messages import (
    ARGUMENTS_AS_TEXT,
    CHAT_MESSAGE,
    ERROR,
    MESSAGE,
    PROMPT,
    RESPONSE,
    parse_messages,
    sft_messages,
)
from tracelearn.pipelines.stats import transitions_directory
from tracelearn.schemas.dataset import DatasetError, read_table
from tracelearn.storage.atomic_parquet import write_parquet_atomically

__all__ = [
    "CHAT_MESSAGE",
    "EXTRA_INFO",
    "MESSAGE",
    "REPLAY_COLUMN",
    "REPLAY_SCHEMA",
    "REPLAY_TOKENS",
    "RL_SCHEMA",
    "SFT_SCHEMA",
    "BadMessages",
    "ExportError",
    "VerlExport",
    "assign_split",
    "load_transitions",
    "replay_field",
    "to_verl_replay",
    "to_verl_rl",
    "to_verl_sft",
    "write_verl_export",
]

COMPRESSION = "zstd"
TRAIN, VALIDATION = "train", "val"
DEFAULT_DATA_SOURCE = "tracelearn"
DEFAULT_ABILITY = "agent"
# verl's reward manager dispatches on ``reward_model.style``; "rule" is what its examples use.
REWARD_STYLE = "rule"

# Arrow types of the files, fixed at the write edge (polars would write large/view types).
REWARD_MODEL = pa.struct([pa.field("style", pa.string()), pa.field("ground_truth", pa.string())])
EXTRA_INFO = pa.struct(
    [
        pa.field("split", pa.string()),
        pa.field("index", pa.int64()),
        pa.field("task_id", pa.string()),
        pa.field("rollout_id", pa.string()),
        pa.field("step_index", pa.int32()),
        pa.field("trace_id", pa.string()),
        pa.field("span_id", pa.string()),
        pa.field("pipeline_config_hash", pa.string()),
        pa.field("reward", pa.float64()),
        pa.field("advantage", pa.float64()),
        pa.field("n_rollouts", pa.int64()),
    ]
)
_RL_FIELDS = [
    pa.field("data_source", pa.string()),
    pa.field("prompt", pa.list_(CHAT_MESSAGE)),
    pa.field("ability", pa.string()),
    pa.field("reward_model", REWARD_MODEL),
    pa.field("extra_info", EXTRA_INFO),
]
RL_SCHEMA = pa.schema(_RL_FIELDS)
# The stored tokens of a replay row, under one column name verl never uses (see the module docstring).
REPLAY_COLUMN = "tracelearn_replay"
REPLAY_TOKENS = pa.struct(
    [
        pa.field("prompt_ids", pa.list_(pa.int32())),
        pa.field("response_ids", pa.list_(pa.int32())),
        pa.field("response_mask", pa.list_(pa.int8())),
        pa.field("response_logprobs", pa.list_(pa.float32())),
        pa.field("advantage", pa.float64()),
        # The temperature the call was sampled at (null: unknown): verl divides the logits by one
        # temperature per job, which the verl backend takes from these (refusing a mix).
        pa.field("temperature", pa.float64()),
    ]
)
REPLAY_SCHEMA = pa.schema([*_RL_FIELDS, pa.field(REPLAY_COLUMN, REPLAY_TOKENS)])
# An SFT export's schema when no message has tool calls, a tool call id or a name; otherwise
# ``messages`` holds those fields too (see ``sft_messages``).
SFT_SCHEMA = pa.schema(
    [
        pa.field("data_source", pa.string()),
        pa.field("messages", pa.list_(CHAT_MESSAGE)),
        pa.field("extra_info", EXTRA_INFO),
    ]
)
class ExportError(ValueError):
    """The transitions cannot be exported as asked (path, config hash, nothing to export)."""


@dataclass(frozen=True)
class BadMessages:
    """A transition dropped because its messages JSON did not parse: where it is and why."""

    trace_id: str | None
    span_id: str | None
    error: str


@dataclass
class VerlExport:
    """One export's rows per split and what was left out.

    ``skipped`` counts dropped transitions by reason: ``bad_messages`` (listed in ``bad_messages``),
    ``without_token_ids`` (replay), ``below_min_reward`` (SFT), ``duplicate_prompt`` (RL).
    ``notes`` says where the files differ from the usual shape (SFT tool arguments left as JSON text).
    """

    splits: dict[str, pl.DataFrame]
    schema: pa.Schema
    skipped: dict[str, int] = field(default_factory=dict)
    bad_messages: list[BadMessages] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def replay_field(name: str) -> pl.Expr:
    """One field of a replay row's stored tokens (``prompt_ids``, ``response_ids``, ...)."""
    return pl.col(REPLAY_COLUMN).struct.field(name)


def load_transitions(path: Path, config_hash_prefix: str | None = None) -> pl.LazyFrame:
    """The transitions under ``path`` (output root or its ``transitions/``) of one pipeline config.

    Several config hashes may coexist in a build output (one file per hash and date); unless
    ``config_hash_prefix`` picks one, more than one is an :class:`ExportError` listing them.
    """
    directory = transitions_directory(path)
    try:
        transitions = pl.from_arrow(read_table(directory, "transitions"))
    except DatasetError as exc:
        raise ExportError(str(exc)) from exc
    assert isinstance(transitions, pl.DataFrame)
    hashes = sorted(transitions["pipeline_config_hash"].drop_nulls().unique().to_list())
    if not hashes:
        raise ExportError(f"{directory}: no transitions to export")
    if config_hash_prefix is not None:
        hashes = [value for value in hashes if value.startswith(config_hash_prefix)]
        if len(hashes) != 1:
            found = "none" if not hashes else ", ".join(value[:16] for value in hashes)
            raise ExportError(
                f"{directory}: --config-hash {config_hash_prefix!r} must match exactly one config hash; matched {found}"
            )
    elif len(hashes) > 1:
        raise ExportError(
            f"{directory}: transitions of {len(hashes)} pipeline configs; pick one with --config-hash: "
            + ", ".join(value[:16] for value in hashes)
        )
    return transitions.lazy().filter(pl.col("pipeline_config_hash") == hashes[0])


def _validation_fraction_of(task_key: str) -> float:
    """Where ``task_key`` falls in [0, 1), the same on every run, machine and polars version."""
    digest = hashlib.sha256(task_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _task_positions(keys: pl.Series) -> pl.Series:
    # Hash each distinct task once (tasks are far fewer than rows), then map the rows onto them.
    distinct = keys.unique().drop_nulls().to_list()
    positions = {key: _validation_fraction_of(key) for key in distinct}
    return keys.replace_strict(positions, return_dtype=pl.Float64)


def assign_split(frame: pl.LazyFrame, val_fraction: float) -> pl.LazyFrame:
    """Add ``split`` (``train`` or ``val``) by the task: reads ``task_id`` (else ``rollout_id``).

    A task whose SHA-256 position is below ``val_fraction`` is validation, so every transition of a
    task is in one split and the split does not change between runs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"val_fraction must be in [0, 1), got {val_fraction}")
    position = pl.coalesce("task_id", "rollout_id").map_batches(_task_positions, return_dtype=pl.Float64)
    return frame.with_columns(
        pl.when(position < val_fraction).then(pl.lit(VALIDATION)).otherwise(pl.lit(TRAIN)).alias("split")
    )


def _split_off_bad_messages(frame: pl.DataFrame, export: VerlExport) -> pl.DataFrame:
    """Record the rows whose messages did not parse in ``export``; return the others."""
    bad = frame.filter(pl.col(ERROR).is_not_null())
    export.skipped["bad_messages"] = bad.height
    export.bad_messages = [
        BadMessages(row["trace_id"], row["span_id"], row[ERROR])
        for row in bad.select("trace_id", "span_id", ERROR).iter_rows(named=True)
    ]
    return frame.filter(pl.col(ERROR).is_null())


def _extra_info(n_rollouts: pl.Expr) -> pl.Expr:
    """The provenance struct; reads the split, index and transition columns of the row."""
    return pl.struct(
        pl.col("split"),
        pl.col("index"),
        pl.col("task_id"),
        pl.col("rollout_id"),
        pl.col("step_index"),
        pl.col("trace_id"),
        pl.col("span_id"),
        pl.col("pipeline_config_hash"),
        pl.col("reward"),
        pl.col("advantage"),
        n_rollouts.cast(pl.Int64).alias("n_rollouts"),
    ).alias("extra_info")


def _rl_columns(data_source: str, ability: str, n_rollouts: pl.Expr) -> list[pl.Expr]:
    chat = pl.col(PROMPT).list.eval(pl.struct(pl.element().struct.field("role"), pl.element().struct.field("content")))
    return [
        pl.lit(data_source).alias("data_source"),
        chat.alias("prompt"),
        pl.lit(ability).alias("ability"),
        # No ground truth is captured yet; the empty string keeps the column verl indexes present.
        pl.struct(pl.lit(REWARD_STYLE).alias("style"), pl.lit("").alias("ground_truth")).alias("reward_model"),
        _extra_info(n_rollouts),
    ]


def _with_index(frame: pl.DataFrame, order: list[str]) -> pl.DataFrame:
    """Sort deterministically and number the rows within each split (verl's ``extra_info.index``)."""
    return frame.sort(order).with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("split").alias("index"))


def _into_splits(frame: pl.DataFrame, export: VerlExport) -> VerlExport:
    export.splits = {name: frame.filter(pl.col("split") == name) for name in (TRAIN, VALIDATION)}
    return export


def to_verl_rl(
    transitions: pl.LazyFrame,
    val_fraction: float = 0.1,
    data_source: str = DEFAULT_DATA_SOURCE,
    ability: str = DEFAULT_ABILITY,
) -> VerlExport:
    """verl RL prompts: one row per task and distinct initial prompt (RL_SCHEMA).

    Reads the TRANSITIONS columns; keeps each rollout's first selected call (lowest ``step_index``),
    then one row per (``task_id``, prompt), provenance from its first rollout by ``rollout_id``.
    """
    export = VerlExport(splits={}, schema=RL_SCHEMA)
    first_calls = (
        transitions.sort("rollout_id", "step_index")
        .unique(subset=["rollout_id"], keep="first", maintain_order=True)
        .pipe(parse_messages)
        .pipe(assign_split, val_fraction)
        .collect()
    )
    parsed = _split_off_bad_messages(first_calls, export)
    prompt_key = ["task_id", "prompt_messages"]
    n_rollouts = pl.len().over(prompt_key)
    distinct = (
        parsed.sort("task_id", "rollout_id")
        .with_columns(n_rollouts.alias("__n_rollouts"))
        .unique(subset=prompt_key, keep="first", maintain_order=True)
    )
    export.skipped["duplicate_prompt"] = parsed.height - distinct.height
    rows = _with_index(distinct, ["split", "task_id", "rollout_id"]).select(
        _rl_columns(data_source, ability, pl.col("__n_rollouts"))
    )
    return _into_splits(rows.with_columns(pl.col("extra_info").struct.field("split")), export)


def to_verl_replay(
    transitions: pl.LazyFrame,
    val_fraction: float = 0.1,
    data_source: str = DEFAULT_DATA_SOURCE,
    ability: str = DEFAULT_ABILITY,
) -> VerlExport:
    """One row per transition with stored tokens: the RL columns plus ``tracelearn_replay`` (REPLAY_SCHEMA).

    Reads the TRANSITIONS columns; ``tracelearn_replay`` holds the server's ``prompt_ids`` and
    ``response_ids``, ``response_mask`` (the ``loss_mask``, all ones when null), ``response_logprobs``,
    ``advantage`` and ``temperature`` (what it was sampled at); the transition's reward stays in
    ``extra_info.reward``. Transitions without prompt or response token ids are dropped and counted as
    ``without_token_ids``.
    """
    export = VerlExport(splits={}, schema=REPLAY_SCHEMA)
    has_tokens = pl.col("prompt_token_ids").is_not_null() & pl.col("response_token_ids").is_not_null()
    frame = transitions.pipe(parse_messages).pipe(assign_split, val_fraction).collect()
    export.skipped["without_token_ids"] = frame.filter(~has_tokens).height
    parsed = _split_off_bad_messages(frame.filter(has_tokens), export)
    all_ones = pl.col("response_token_ids").list.eval(pl.lit(1, dtype=pl.Int8))
    rows = _with_index(parsed, ["split", "task_id", "rollout_id", "step_index"]).select(
        *_rl_columns(data_source, ability, pl.lit(1)),
        pl.struct(
            pl.col("prompt_token_ids").alias("prompt_ids"),
            pl.col("response_token_ids").alias("response_ids"),
            pl.coalesce("loss_mask", all_ones).alias("response_mask"),
            pl.col("response_logprobs"),
            pl.col("advantage"),
            pl.col("temperature"),
        ).alias(REPLAY_COLUMN),
    )
    return _into_splits(rows.with_columns(pl.col("extra_info").struct.field("split")), export)


def to_verl_sft(
    transitions: pl.LazyFrame,
    min_reward: float | None = None,
    val_fraction: float = 0.1,
    data_source: str = DEFAULT_DATA_SOURCE,
) -> VerlExport:
    """verl multi-turn SFT conversations: prompt messages + response messages per transition (SFT_SCHEMA).

    Reads the TRANSITIONS columns. With ``min_reward``, rows whose ``reward`` is null or below it are
    dropped and counted as ``below_min_reward``.
    """
    export = VerlExport(splits={}, schema=SFT_SCHEMA)
    good_enough = pl.lit(True) if min_reward is None else pl.col("reward").fill_null(float("-inf")) >= min_reward
    frame = transitions.pipe(parse_messages).pipe(assign_split, val_fraction).collect()
    export.skipped["below_min_reward"] = frame.filter(~good_enough).height
    parsed = _split_off_bad_messages(frame.filter(good_enough), export)
    rows = _with_index(parsed, ["split", "task_id", "rollout_id", "step_index"]).select(
        pl.lit(data_source).alias("data_source"),
        pl.concat_list(PROMPT, RESPONSE).alias("messages"),
        _extra_info(pl.lit(1)),
    )
    messages, arguments_as_text = sft_messages(rows["messages"].to_list())
    if arguments_as_text:
        export.notes.append(ARGUMENTS_AS_TEXT)
    export.schema = SFT_SCHEMA.set(1, pa.field("messages", messages.type))
    rows = rows.with_columns(pl.Series("messages", pl.from_arrow(messages)))
    return _into_splits(rows.with_columns(pl.col("extra_info").struct.field("split")), export)


def export_table(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """``frame`` as an Arrow table of exactly ``schema`` (plain string/list types, not polars' large ones)."""
    return frame.select(schema.names).to_arrow().cast(schema)


def write_verl_export(export: VerlExport, out: Path) -> list[Path]:
    """Write ``out/train.parquet`` and ``out/val.parquet``, each appearing complete or not at all."""
    return [
        write_parquet_atomically(export_table(rows, export.schema), out, f"{name}.parquet", COMPRESSION)
        for name, rows in export.splits.items()
    ]
