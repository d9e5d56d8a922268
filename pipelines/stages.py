"""Programmable pipeline stages: built-in and user functions ``LazyFrame -> LazyFrame``.

A stage is named in ``pipeline.yaml`` under ``stages:`` either by a built-in name
(``drop_failed_rollouts``) or by a ``module:function`` import path
(``my_pkg.stages:dedupe_by_prompt``), optionally with its own parameters::

    stages: [drop_failed_rollouts, {my_pkg.stages:dedupe_by_prompt: {keep: last}}]

A stage function takes the transitions frame as its first positional argument, its parameters as
keyword arguments, and returns a new LazyFrame (see :class:`Stage`). :func:`resolve_stage` checks a
stage at config load, before any data is read: the name or import path, that the object is callable,
and that its signature accepts the frame plus exactly the parameters given (and, for built-ins, that
the parameter values are valid). :func:`run_stages` applies the stages in order and, after each one,
checks on the lazy schema (no data read) that the required columns are still there.

A user stage is user Python code: its call runs on a thread and may take ``StageSpec.timeout_s``
seconds (``timeouts.stage_seconds`` in ``pipeline.yaml``); past that, or when it raises (``SystemExit``
and ``KeyboardInterrupt`` included), the build stops with a :class:`StageError` naming the stage. A
thread cannot be killed, so a stage that hangs is left running until the process exits (the CLI and
an Airflow task exit on the error); the plan a stage returns runs later, in the build's own collect.

Built-in stages work on transitions frames (one row per LLM call, columns of
``tracelearn.schemas.tables.TRANSITIONS``) and read these extra columns where documented:

- ``rollout_status`` (String): the ``status`` of the call's rollout (``ok``, ``error``,
  ``incomplete``, from the rollouts table), joined on ``rollout_id`` by the pipeline before the user
  stages run.
- ``zero_signal`` (Boolean): added by ``tracelearn.pipelines.advantages.grpo_advantages``.

Every error is a :class:`StageError` whose message names the stage.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl

__all__ = [
    "BUILTIN_STAGES",
    "DEFAULT_STAGE_TIMEOUT_S",
    "BoundStage",
    "Stage",
    "StageError",
    "StageSpec",
    "dedupe_by_prompt",
    "drop_failed_rollouts",
    "drop_zero_signal_groups",
    "import_callable",
    "max_response_tokens",
    "min_reward",
    "resolve_stage",
    "resolve_stages",
    "run_stages",
]


DEFAULT_STAGE_TIMEOUT_S = 60.0


class StageError(ValueError):
    """A stage is unknown, cannot be imported, has the wrong signature or breaks the frame."""


class Stage(Protocol):
    """A pipeline stage: ``stage(lf, **params) -> LazyFrame``; pure, lazy, no data read."""

    def __call__(self, lf: pl.LazyFrame, /, **params: Any) -> pl.LazyFrame: ...


@dataclass(frozen=True)
class StageSpec:
    """A stage as written in the config: a built-in name or ``module:function``, its params, and the
    seconds a user stage's call may take (``timeouts.stage_seconds``)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = DEFAULT_STAGE_TIMEOUT_S


@dataclass(frozen=True)
class BoundStage:
    """A resolved stage: the function, the parameters it is called with, and (a user stage) the
    seconds its call may take."""

    name: str
    function: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None

    def __call__(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """Apply the stage; raises :class:`StageError` if it does not return a LazyFrame, raises, or
        (with ``timeout_s``) does not return in time."""
        if self.timeout_s is None:
            result = self.function(lf, **self.params)
        else:
            result = _call_user_stage(self, lf, self.timeout_s)
        if not isinstance(result, pl.LazyFrame):
            raise StageError(
                f"stage {self.name!r} returned {type(result).__name__}, not a polars LazyFrame; "
                "a stage must return a LazyFrame (use .lazy() on a DataFrame)"
            )
        return result


def _call_user_stage(stage: BoundStage, lf: pl.LazyFrame, timeout_s: float) -> Any:
    """``stage.function(lf, **params)`` on a thread, waited for at most ``timeout_s`` seconds."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = stage.function(lf, **stage.params)
        except BaseException as error:  # user code: even SystemExit is the stage's error
            outcome["error"] = error

    thread = threading.Thread(target=call, name=f"stage {stage.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StageError(
            f"stage {stage.name!r} did not return within {timeout_s:g} s (timeouts.stage_seconds); a stage "
            "builds a lazy plan and should return at once: the build stopped"
        )
    error = outcome.get("error")
    if error is not None:
        raise StageError(f"stage {stage.name!r} raised {type(error).__name__}: {error}") from error
    return outcome["result"]


# Built-in stages ---------------------------------------------------------------------------------

ROLLOUT_STATUSES: tuple[str, ...] = ("ok", "error", "incomplete")
"""Values of the rollouts table's ``status`` column (``rollout_status`` on transitions)."""

_DEDUPE_KEEP: tuple[str, ...] = ("first", "last")


def drop_failed_rollouts(lf: pl.LazyFrame, keep_incomplete: bool = False) -> pl.LazyFrame:
    """Keep only the calls of rollouts whose status is ``ok`` (and ``incomplete`` if asked).

    Reads ``rollout_status``; adds nothing. Rows with a null status are dropped.
    """
    if not isinstance(keep_incomplete, bool):
        raise StageError(f"stage 'drop_failed_rollouts': keep_incomplete={keep_incomplete!r} must be true or false")
    kept = ["ok", "incomplete"] if keep_incomplete else ["ok"]
    return lf.filter(pl.col("rollout_status").is_in(kept))


def drop_zero_signal_groups(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Drop the rows of GRPO groups whose rewards are all equal (no learning signal).

    Reads ``zero_signal``; adds nothing. A null ``zero_signal`` counts as False (the row is kept).
    """
    return lf.filter(~pl.col("zero_signal").fill_null(False))


def dedupe_by_prompt(lf: pl.LazyFrame, keep: str = "first") -> pl.LazyFrame:
    """Keep one call per (``task_id``, ``prompt_messages``): the first or last in frame order.

    Reads ``task_id``, ``prompt_messages``; adds nothing; keeps the frame's row order. Rows with a
    null ``prompt_messages`` are all kept (an unknown prompt is not a duplicate).
    """
    if keep not in _DEDUPE_KEEP:
        raise StageError(f"stage 'dedupe_by_prompt': keep={keep!r} is unknown; use one of {', '.join(_DEDUPE_KEEP)}")
    key = pl.struct("task_id", "prompt_messages")
    distinct = key.is_first_distinct() if keep == "first" else key.is_last_distinct()
    return lf.filter(distinct | pl.col("prompt_messages").is_null())


def min_reward(lf: pl.LazyFrame, threshold: float, column: str = "reward") -> pl.LazyFrame:
    """Keep rows whose ``column`` (default ``reward``, the primary reward) is ``>= threshold``.

    Reads ``column``; adds nothing. Rows with a null reward are dropped.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise StageError(f"stage 'min_reward': threshold={threshold!r} must be a finite number")
    if not isinstance(column, str) or not column:
        raise StageError(f"stage 'min_reward': column={column!r} must be a column name")
    return lf.filter(pl.col(column) >= float(threshold))


def max_response_tokens(lf: pl.LazyFrame, n: int) -> pl.LazyFrame:
    """Drop calls whose response has more than ``n`` tokens.

    Reads ``response_token_ids``; adds nothing. Rows without token ids (null) are kept: their
    length is unknown until retokenization.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise StageError(f"stage 'max_response_tokens': n={n!r} must be an integer >= 0")
    tokens = pl.col("response_token_ids")
    return lf.filter(tokens.is_null() | (tokens.list.len() <= n))


BUILTIN_STAGES: dict[str, Callable[..., pl.LazyFrame]] = {
    "drop_failed_rollouts": drop_failed_rollouts,
    "drop_zero_signal_groups": drop_zero_signal_groups,
    "dedupe_by_prompt": dedupe_by_prompt,
    "min_reward": min_reward,
    "max_response_tokens": max_response_tokens,
}
"""Built-in stages by name."""


# Resolution --------------------------------------------------------------------------------------


def import_callable(path: str, what: str) -> Callable[..., Any]:
    """Import ``module:attribute`` and check it is callable; ``what`` names it in errors.

    Raises :class:`StageError` naming the path and the problem (malformed path, module not
    importable with the import error, attribute missing, not callable).
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise StageError(f"{what} {path!r}: malformed import path; write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code is a config error
        raise StageError(
            f"{what} {path!r}: module {module_name!r} cannot be imported ({type(exc).__name__}: {exc})"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise StageError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise StageError(f"{what} {path!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def _check_signature(name: str, function: Callable[..., Any], params: Mapping[str, Any]) -> None:
    """Check that ``function(lf, **params)`` binds: a first positional parameter, params known."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    has_var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())
    if not positional and not has_var_positional:
        raise StageError(
            f"stage {name!r}: signature {signature} takes no positional parameter; "
            "a stage is called as stage(lf: polars.LazyFrame, **params)"
        )
    try:
        signature.bind(pl.LazyFrame(), **params)
    except TypeError as exc:
        accepted = [p.name for p in positional[1:]] + [
            p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        raise StageError(
            f"stage {name!r}: parameters {dict(params)!r} do not fit signature {signature} ({exc}); "
            f"accepted parameters: {', '.join(accepted) or 'none'}"
        ) from None


def resolve_stage(spec: StageSpec | str) -> BoundStage:
    """Resolve a built-in name or ``module:function`` path to a :class:`BoundStage`.

    Validates everything that can be checked without data; raises :class:`StageError` naming the
    stage: unknown built-in (with close names), malformed path, module not importable, attribute
    missing, not callable, no positional frame parameter, missing required or unknown parameters,
    and (built-ins) invalid parameter values.
    """
    if isinstance(spec, str):
        spec = StageSpec(spec)
    name, params = spec.name, dict(spec.params)
    if not isinstance(name, str) or not name:
        raise StageError(f"stage name {name!r} must be a built-in stage name or 'module:function'")
    if ":" in name:
        function = import_callable(name, "stage")
        _check_signature(name, function, params)
        return BoundStage(name, function, params, spec.timeout_s)
    if name not in BUILTIN_STAGES:
        close = difflib.get_close_matches(name, BUILTIN_STAGES, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise StageError(
            f"stage {name!r} is not a built-in stage; {hint}built-ins: {', '.join(sorted(BUILTIN_STAGES))}; "
            "a user stage is written 'package.module:function'"
        )
    builtin = BUILTIN_STAGES[name]
    _check_signature(name, builtin, params)
    builtin(pl.LazyFrame(), **params)  # validates parameter values; builds a plan, reads nothing
    return BoundStage(name, builtin, params)


def resolve_stages(specs: Iterable[StageSpec | str]) -> list[BoundStage]:
    """Resolve every stage of a config, in order (see :func:`resolve_stage`)."""
    return [resolve_stage(spec) for spec in specs]


def run_stages(lf: pl.LazyFrame, stages: Iterable[BoundStage], required_columns: Iterable[str]) -> pl.LazyFrame:
    """Apply ``stages`` in order; after each, check ``required_columns`` are still in the schema.

    The check uses the lazy schema (``collect_schema``): no data is read. Raises
    :class:`StageError` naming the stage and the columns it dropped, or the stage's own error
    if its plan is invalid (e.g. it reads a column the frame does not have).
    """
    required = list(dict.fromkeys(required_columns))
    for stage in stages:
        lf = stage(lf)
        try:
            names = set(lf.collect_schema().names())
        except pl.exceptions.PolarsError as exc:
            raise StageError(f"stage {stage.name!r} builds an invalid plan: {exc}") from exc
        missing = [column for column in required if column not in names]
        if missing:
            raise StageError(
                f"stage {stage.name!r} dropped required column(s) {', '.join(missing)}; "
                "a stage may add columns and filter rows but must keep these"
            )
    return lf
