"""Rewards besides emitted reward spans: a reward function applied per rollout, and late feedback.

Each source yields long-format reward rows ``rollout_id, reward_name, reward, source, time``
(``REWARD_ROWS_SCHEMA``); ``tracelearn.pipelines.rollouts`` merges them with the emitted rewards into
the rollout's ``rewards`` map and picks the primary one. Every row depends only on its own rollout's
spans and feedback, so a build may run over any subset of whole rollouts (one bucket at a time).

Reward function (``reward.function``): ``FILE.py:function``, a Python file named by its path (relative
to the pipeline config's directory, or absolute) and loaded as a module of its own, or
``package.module:function``, a module on the import path (installed, or on ``PYTHONPATH``). Nothing is
added to the import path: a reward file imports installed packages, not its neighbours (make shared
code a package and name it by module path). It is called once per rollout with keyword arguments
chosen by its parameter names:

- ``answer``: text content of the response of the rollout's last LLM call (by start time) that has one;
- ``messages``: that call's prompt messages followed by its response messages (OpenAI-style dicts);
- ``spans``: the rollout's spans as dicts ordered by start time (``attributes`` as a dict);
- ``metadata``: the ``tracelearn.metadata.<key>`` attributes of the rollout's spans as a dict (the
  earliest span carrying a key wins); JSON objects and arrays are decoded, scalars stay the text they
  were stored as, because a number and the string of its digits are stored alike;
- ``task_id``, ``rollout_id``;
- any other name is looked up as a metadata key (``score(answer, gold)`` reads ``tracelearn.metadata.gold``);
  a parameter with a default takes it when the key is absent; ``**kwargs`` receives every metadata key.

It returns a number (stored under the configured name) or a ``dict[str, number]`` (several named
rewards). A rollout whose needed input is absent (no such metadata key, no LLM response), whose call
raises (``SystemExit`` and ``KeyboardInterrupt`` included), does not return within the function's
timeout, or whose result is not a finite number gets no function reward; it is counted per cause in a
:class:`FunctionRewardReport` (which keeps the first failure's message) and the build goes on. The
calls run in a worker process that is killed when a call overruns its timeout
(``tracelearn.pipelines.reward_calls``).

Feedback (``<data root>/feedback/date=YYYY-MM-DD/*.parquet``, the FEEDBACK table, written by
``tracelearn.collector.feedback``): a row applies to the rollout of its ``rollout_id``, or to every
rollout whose ``trace_ids`` hold its ``trace_id``. Rows are de-duplicated by ``feedback_id``; when a
rollout has several feedback rows of one name, the latest by ``time`` wins (ties: the greatest
``feedback_id``).
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from polars.datatypes import DataTypeClass

from tracelearn.pipelines.reward_calls import RewardWorkerError, call_reward_function
from tracelearn.pipelines.reward_worker import BUILTIN_ARGUMENTS, find_function
from tracelearn.pipelines.spans_input import check_columns, distinct_spans
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.dataset import DatasetError, dataset_files, file_schema_version
from tracelearn.schemas.migrations import SchemaVersionError
from tracelearn.schemas.tables import FEEDBACK

__all__ = [
    "BUILTIN_ARGUMENTS",
    "DEFAULT_REWARD_TIMEOUT_S",
    "REWARD_ROWS_SCHEMA",
    "SOURCE_FEEDBACK",
    "SOURCE_FUNCTION",
    "FunctionRewardReport",
    "RewardFunction",
    "RewardFunctionError",
    "RewardSources",
    "feedback_directory",
    "feedback_reward_rows",
    "function_reward_rows",
    "load_reward_function",
    "reward_function_file",
    "scan_feedback",
]

logger = logging.getLogger(__name__)

DEFAULT_REWARD_TIMEOUT_S = 60.0
TIME_DTYPE = pl.Datetime("ns", "UTC")
REWARD_ROWS_DTYPES: dict[str, pl.DataType] = {
    "rollout_id": pl.String(),
    "reward_name": pl.String(),
    "reward": pl.Float64(),
    "source": pl.String(),
    "time": TIME_DTYPE,
}
REWARD_ROWS_SCHEMA = pl.Schema(REWARD_ROWS_DTYPES)
SOURCE_FUNCTION = "function"
SOURCE_FEEDBACK = "feedback"
_ENTRIES_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.String}))
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class RewardFunctionError(ValueError):
    """A reward function cannot be used: not importable, or a signature the pipeline cannot call."""


@dataclass(frozen=True)
class RewardFunction:
    """A reward function checked at load: ``path`` as the config wrote it (``FILE.py:function`` or
    ``module:function``), the ``file`` it names (resolved; ``None`` for a module), the reward ``name`` a
    plain number is stored under, the callable, its keyword-passable parameters and the seconds one
    call may take."""

    path: str
    name: str
    function: Callable[..., Any]
    parameters: tuple[inspect.Parameter, ...]
    takes_any_keyword: bool
    timeout_s: float = DEFAULT_REWARD_TIMEOUT_S
    file: Path | None = None

    def needs(self, argument: str) -> bool:
        return any(p.name == argument for p in self.parameters)


def reward_function_file(reference: str, base_dir: Path) -> Path | None:
    """The file a ``FILE.py:function`` reference names, resolved against ``base_dir`` (the pipeline
    config's directory); ``None`` for a ``module:function`` reference."""
    location = reference.rpartition(":")[0]
    return (base_dir / location).resolve() if location.endswith(".py") else None


def _found(path: str, file: Path | None) -> Callable[..., Any]:
    """``reward_worker.find_function``, its failures as :class:`RewardFunctionError` saying what was tried."""
    location, separator, attribute = path.rpartition(":")
    if not separator or not location or not attribute:
        raise RewardFunctionError(f"reward function {path!r}: malformed import path; write it as FILE.py:function "
                                  "(a file relative to the config) or package.module:function (a module on the "
                                  "import path)")
    searched = ", ".join(entry or "<current directory>" for entry in sys.path) or "empty"
    try:
        return find_function(path, None if file is None else str(file))
    except FileNotFoundError:
        raise RewardFunctionError(f"reward function {path!r}: no such file: {file} (a file is named relative "
                                  "to the config's directory)") from None
    except (AttributeError, TypeError) as exc:
        raise RewardFunctionError(f"reward function {path!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        if file is not None:  # the file imports a module that is not installed
            raise RewardFunctionError(f"reward function {path!r}: loading the file {file} raised "
                                      f"ModuleNotFoundError: {exc}") from exc
        raise RewardFunctionError(f"reward function {path!r}: module {location!r} cannot be imported ({exc}); "
                                  f"searched the import path: {searched}. A reward file next to the config is "
                                  "named by its path instead, e.g. reward.py:score") from None
    except (Exception, SystemExit) as exc:  # user code: its import may raise anything
        loading = f"the file {file}" if file is not None else f"module {location!r}"
        raise RewardFunctionError(
            f"reward function {path!r}: loading {loading} raised {type(exc).__name__}: {exc}"
        ) from exc


def load_reward_function(path: str, name: str, timeout_s: float = DEFAULT_REWARD_TIMEOUT_S,
                         file: Path | None = None) -> RewardFunction:
    """Find ``path`` (``FILE.py:function`` loaded from ``file``, see :func:`reward_function_file`;
    without ``file``, relative to the current directory; or ``module:function``) and check that the
    pipeline can call it by keyword; each call may take ``timeout_s`` seconds.

    Raises :class:`RewardFunctionError` naming the function and what was tried when it cannot be
    found, has no readable signature, has positional-only parameters, or takes no keyword-passable
    parameter.
    """
    if file is None:
        file = reward_function_file(path, Path.cwd())
    function = _found(path, file)
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise RewardFunctionError(
            f"reward function {path!r}: its signature cannot be read; wrap it in a Python function"
        ) from None
    kinds = {p.name: p.kind for p in signature.parameters.values()}
    positional_only = [n for n, k in kinds.items() if k is inspect.Parameter.POSITIONAL_ONLY]
    if positional_only:
        raise RewardFunctionError(
            f"reward function {path!r}: parameters {', '.join(positional_only)} are positional-only; "
            "the pipeline passes arguments by name, drop the '/'"
        )
    parameters = tuple(p for p in signature.parameters.values() if p.kind in _KEYWORD_KINDS)
    takes_any_keyword = inspect.Parameter.VAR_KEYWORD in kinds.values()
    if not parameters and not takes_any_keyword:
        raise RewardFunctionError(
            f"reward function {path!r}: takes no named parameters; name the inputs it needs "
            f"({', '.join(BUILTIN_ARGUMENTS)} or metadata keys), e.g. def score(answer, gold)"
        )
    return RewardFunction(path, name, function, parameters, takes_any_keyword, timeout_s, file)


@dataclass
class FunctionRewardReport:
    """What applying a reward function did: rollouts rewarded, failures per cause, the first failure.

    ``errors`` counts the calls that raised or did not return in time; ``timeouts`` those of them that
    timed out (or were not made after timeouts in a row).
    """

    rewarded: int = 0
    missing_input: int = 0
    errors: int = 0
    invalid: int = 0
    timeouts: int = 0
    first_failure: str | None = None

    def fail(self, cause: str, rollout_id: str, message: str) -> None:
        if cause == "timeouts":
            self.timeouts += 1
            cause = "errors"
        setattr(self, cause, getattr(self, cause) + 1)
        if self.first_failure is None:
            self.first_failure = f"rollout {rollout_id}: {message}"


@dataclass(frozen=True)
class RewardSources:
    """Which rewards a rollout build uses and which is primary (``None``: the emitted primary, else
    the earliest feedback). ``feedback`` is the feedback table (see :func:`scan_feedback`)."""

    emitted: bool = True
    function: RewardFunction | None = None
    feedback: pl.LazyFrame | None = None
    primary: str | None = None

    @property
    def emitted_only(self) -> bool:
        """Nothing to merge: the rollouts' emitted reward columns are already final."""
        return self.emitted and self.function is None and self.feedback is None and self.primary is None


# Reward function ---------------------------------------------------------------------------------


def _plain(dtype: pl.DataType | DataTypeClass) -> pl.DataType | DataTypeClass:
    """``dtype`` with every ``Map`` (at any depth) as the list of ``{key, value}`` structs it is stored
    as, and nanosecond times as microseconds (what a Python ``datetime`` holds).

    Polars (2.1) builds a struct of whole spans wrongly when a column nests a map (``events``: the key
    field's nullability differs between chunks, and ``collect`` panics), so such columns are cast
    first; and Arrow would hand a nanosecond time to Python as a pandas ``Timestamp``.
    """
    if isinstance(dtype, pl.Map):
        return pl.List(pl.Struct({"key": _plain(dtype.key), "value": _plain(dtype.value)}))
    if isinstance(dtype, pl.List):
        return pl.List(_plain(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return pl.Struct({f.name: _plain(f.dtype) for f in dtype.fields})
    if isinstance(dtype, pl.Datetime) and dtype.time_unit == "ns":
        return pl.Datetime("us", dtype.time_zone)
    return dtype


def _function_inputs(spans: pl.LazyFrame, rollouts: pl.LazyFrame, with_spans: bool) -> pl.DataFrame:
    """Per rollout of ``rollouts``: ``rollout_id``, ``task_id``, ``input_messages``, ``output_messages``
    (of the last LLM call with a response), ``metadata`` (list of ``{key, value}``) and, with
    ``with_spans``, ``spans`` (list of span structs ordered by start time).

    Reads spans ``rollout_id``, ``trace_id``, ``span_id``, ``span_type``, ``start_time``,
    ``attributes``, ``input_messages``, ``output_messages``; rollouts ``rollout_id``, ``task_id``.
    """
    ids = rollouts.select("rollout_id", "task_id")
    ordered = (
        spans.join(ids.select("rollout_id"), on="rollout_id", how="semi")
        .pipe(distinct_spans)
        .sort(["rollout_id", "start_time", "trace_id", "span_id"])
        .with_columns(pl.col("attributes").cast(_ENTRIES_DTYPE))
    )
    last_call = (
        ordered.filter((pl.col("span_type") == sc.TYPE_LLM) & pl.col("output_messages").is_not_null())
        .group_by("rollout_id")
        .agg(pl.col("input_messages").last(), pl.col("output_messages").last())
    )
    metadata = (
        ordered.select("rollout_id", pl.col("attributes").alias("__attribute"))
        .explode("__attribute")
        .unnest("__attribute")
        .filter(pl.col("key").str.starts_with(sc.METADATA_PREFIX))
        .with_columns(pl.col("key").str.strip_prefix(sc.METADATA_PREFIX))
        .unique(subset=["rollout_id", "key"], keep="first", maintain_order=True)
        .group_by("rollout_id")
        .agg(pl.struct("key", "value").alias("metadata"))
    )
    inputs = ids.join(last_call, on="rollout_id", how="left").join(metadata, on="rollout_id", how="left")
    if with_spans:
        schema = ordered.collect_schema()
        plain = ordered.with_columns(pl.col(name).cast(_plain(dtype)) for name, dtype in schema.items()
                                     if _plain(dtype) != dtype)
        all_spans = plain.group_by("rollout_id").agg(pl.struct(pl.all().exclude("rollout_id")).alias("spans"))
        inputs = inputs.join(all_spans, on="rollout_id", how="left")
    return inputs.sort("rollout_id").collect()


def _missing_input(function: RewardFunction, row: dict[str, Any]) -> str | None:
    """What the call would lack (an absent LLM response or metadata key), ``None`` when nothing is missing."""
    keys = {item["key"] for item in row.get("metadata") or ()}
    for parameter in function.parameters:
        name = parameter.name
        if name in ("answer", "messages") and row["output_messages"] is None:
            return f"{name!r}: the rollout has no LLM call with a response"
        if name not in BUILTIN_ARGUMENTS and name not in keys and parameter.default is inspect.Parameter.empty:
            return f"{name!r}: no metadata key {sc.METADATA_PREFIX}{name} on the rollout's spans"
    return None


def _ipc(frame: pl.DataFrame) -> bytes:
    """``frame`` as an Arrow IPC stream (how rows travel to the reward function's worker)."""
    table = frame.to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def function_reward_rows(
    spans: pl.LazyFrame, rollouts: pl.LazyFrame, function: RewardFunction
) -> tuple[pl.DataFrame, FunctionRewardReport]:
    """Apply ``function`` to every rollout of ``rollouts``: reward rows (``REWARD_ROWS_SCHEMA``,
    ``source = 'function'``, sorted by rollout and name) and the report of what failed and why.

    Reads the columns listed in :func:`_function_inputs` (every spans column when the function takes
    ``spans``). One call per rollout, in a worker process with ``function.timeout_s`` per call (see
    ``tracelearn.pipelines.reward_calls``): a reward function is user Python code. Raises
    :class:`RewardFunctionError` when no worker process can run the function at all.
    """
    inputs = _function_inputs(spans, rollouts, with_spans=function.needs("spans"))
    report = FunctionRewardReport()
    rows: list[tuple[str, str, float]] = []
    missing: dict[int, str] = {}
    for index, row in enumerate(inputs.select("output_messages", "metadata").iter_rows(named=True)):
        if (lacking := _missing_input(function, row)) is not None:
            missing[index] = lacking
    called = inputs.filter(~pl.int_range(pl.len()).is_in(list(missing)))
    setup = {"function": function.path, "file": None if function.file is None else str(function.file),
             "name": function.name, "takes_any_keyword": function.takes_any_keyword,
             "parameters": [parameter.name for parameter in function.parameters]}
    outcomes = call_reward_function(setup, called.height, lambda start, stop: _ipc(called[start:stop]),
                                    function.timeout_s)
    try:
        for index, rollout_id in enumerate(inputs.get_column("rollout_id")):  # failures are reported in rollout order
            if index in missing:
                report.fail("missing_input", rollout_id, f"{function.path} needs {missing[index]}")
                continue
            outcome = next(outcomes)
            if outcome.outcome == "ok":
                report.rewarded += 1
                rows.extend((rollout_id, name, value) for name, value in sorted(outcome.rewards.items()))
            else:
                report.fail(outcome.outcome, rollout_id, outcome.message)
    except RewardWorkerError as error:
        raise RewardFunctionError(str(error)) from None
    finally:
        outcomes.close()
    if report.timeouts:
        logger.warning(
            "reward function %s: %d of %d rollouts got no reward because it did not return within %g s",
            function.path,
            report.timeouts,
            len(called),
            function.timeout_s,
        )
    frame = pl.DataFrame(rows, schema=["rollout_id", "reward_name", "reward"], orient="row").with_columns(
        pl.lit(SOURCE_FUNCTION).alias("source"), pl.lit(None, dtype=TIME_DTYPE).alias("time")
    )
    return frame.cast(REWARD_ROWS_SCHEMA), report


# Feedback ----------------------------------------------------------------------------------------


def feedback_directory(data_root: str | Path) -> Path:
    """The feedback table's directory of a data root: ``<root>/feedback``.

    ``data_root`` may also be the root's ``spans/`` directory (as the build accepts either).
    """
    path = Path(data_root)
    if path.name == "spans" and not (path / "spans").is_dir():
        path = path.parent
    return path / "feedback"


def scan_feedback(directory: str | Path) -> pl.LazyFrame:
    """The feedback rows under ``directory`` (FEEDBACK columns); an empty frame when there are none.

    Raises ``SchemaVersionError`` naming a file written with another feedback schema version and
    ``DatasetError`` for a file that is not a feedback file or has a column that is not the schema's.
    """
    path = Path(directory)
    files = dataset_files(path) if path.exists() else []
    for file in files:
        version = file_schema_version(file, FEEDBACK)
        if version != FEEDBACK.version:
            raise SchemaVersionError(
                f"{file}: feedback schema version {version}; this tracelearn reads version {FEEDBACK.version}"
            )
        check_columns(str(file), FEEDBACK)
    empty = pl.from_arrow(FEEDBACK.schema.empty_table())
    if not isinstance(empty, pl.DataFrame):  # pragma: no cover - from_arrow of a table is a frame
        raise DatasetError(f"{path}: the feedback schema did not convert to a frame")
    if not files:
        return empty.lazy()
    return pl.scan_parquet(files, schema=empty.schema)


def feedback_reward_rows(feedback: pl.LazyFrame, rollouts: pl.LazyFrame) -> pl.LazyFrame:
    """Feedback rewards of ``rollouts`` (``REWARD_ROWS_SCHEMA``, ``source = 'feedback'``), one per
    rollout and name: the latest by ``time`` (ties: greatest ``feedback_id``).

    Reads feedback ``feedback_id``, ``trace_id``, ``rollout_id``, ``name``, ``value``, ``time``;
    rollouts ``rollout_id``, ``trace_ids``.
    """
    unique = feedback.unique(subset=["feedback_id"], keep="first").select(
        "feedback_id", "trace_id", pl.col("rollout_id").alias("__rollout"), "name", "value", "time"
    )
    by_rollout = unique.join(
        rollouts.select(pl.col("rollout_id").alias("__rollout")), on="__rollout", how="inner"
    ).with_columns(pl.col("__rollout").alias("rollout_id"))
    traces = rollouts.select("rollout_id", pl.col("trace_ids").alias("trace_id")).explode("trace_id")
    by_trace = unique.filter(pl.col("trace_id").is_not_null()).join(traces, on="trace_id", how="inner")
    columns = ["rollout_id", "feedback_id", "name", "value", "time"]
    return (
        pl.concat([by_rollout.select(columns), by_trace.select(columns)])
        .unique(subset=["rollout_id", "feedback_id"], keep="first")
        .group_by(["rollout_id", "name"])
        .agg(
            pl.col("value").sort_by(["time", "feedback_id"]).last().alias("reward"),
            pl.col("time").max(),
        )
        .select(
            "rollout_id",
            pl.col("name").alias("reward_name"),
            "reward",
            pl.lit(SOURCE_FEEDBACK).alias("source"),
            pl.col("time").cast(TIME_DTYPE),
        )
        .sort(["rollout_id", "reward_name"])
    )
