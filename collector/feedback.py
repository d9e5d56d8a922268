"""Late rewards (production thumbs-up, graders) appended to the feedback table.

Owns: validating a feedback item (its ``time`` within what the ``timestamp[ns]`` column holds,
1677-09-22 to 2262-04-11) and a request's items (at most ``MAX_FEEDBACK_DATES`` distinct dates, so
one request cannot open thousands of partitions), and appending items atomically as
``<data root>/feedback/date=YYYY-MM-DD/feedback-<uuid>.parquet`` (FEEDBACK schema, ``date`` = the
item's ``time`` in UTC). Every item is checked before any file is written, so a bad item writes
nothing; each file appears complete or not at all. The pipeline joins the table by ``rollout_id`` or
``trace_id`` (``tracelearn.pipelines.rewards``).
"""

import datetime as dt
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracelearn.schemas.tables import FEEDBACK
from tracelearn.storage.atomic_files import partition_directory
from tracelearn.storage.atomic_parquet import write_parquet_atomically

__all__ = ["FeedbackError", "FeedbackItem", "append_feedback", "check_dates", "feedback_item"]

COMPRESSION = "zstd"
# What a timestamp[ns] column holds (int64 nanoseconds since 1970), whole days inside it.
EARLIEST_TIME = dt.datetime(1677, 9, 22, tzinfo=dt.UTC)
LATEST_TIME = dt.datetime(2262, 4, 11, tzinfo=dt.UTC)
# Distinct dates (one partition directory and file each) one request may write.
MAX_FEEDBACK_DATES = 16
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_FIELDS = ("feedback_id", "trace_id", "rollout_id", "name", "value", "time", "source", "attributes")


class FeedbackError(ValueError):
    """A feedback item is invalid; the message names where it came from, the field and the fix."""


@dataclass(frozen=True)
class FeedbackItem:
    """One validated feedback row (see :func:`feedback_item`)."""

    feedback_id: str
    trace_id: str | None
    rollout_id: str | None
    name: str
    value: float
    time: dt.datetime
    source: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


def _optional_text(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise FeedbackError(f"{where}: {key}: {value!r} must be a non-empty string")
    return value


def _time(value: Any, where: str, now: dt.datetime) -> dt.datetime:
    if value is None:
        return now
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise FeedbackError(f"{where}: time: {value!r} is not an ISO 8601 time") from None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise FeedbackError(f"{where}: time: {value!r} needs a time zone (e.g. 2026-11-21T12:00:00+00:00)")
    try:
        utc = value.astimezone(dt.UTC)
    except OverflowError:
        utc = EARLIEST_TIME - dt.timedelta(days=1) if value.year < 2000 else LATEST_TIME + dt.timedelta(days=1)
    if not EARLIEST_TIME <= utc < LATEST_TIME:
        raise FeedbackError(
            f"{where}: time: {value.isoformat()} is outside 1677-09-22 .. 2262-04-10, the times the feedback "
            "table holds"
        )
    return utc


def feedback_item(raw: Mapping[str, Any], where: str = "feedback", now: dt.datetime | None = None) -> FeedbackItem:
    """Validate ``raw`` (keys of the FEEDBACK table) into a :class:`FeedbackItem`.

    ``name`` and a finite ``value`` are required, and ``rollout_id`` or ``trace_id`` (32 lowercase
    hex digits); ``feedback_id`` defaults to a new UUID, ``time`` (aware datetime or ISO text) to
    ``now`` (default the current UTC time). Raises :class:`FeedbackError` prefixed with ``where``.
    """
    unknown = sorted(str(key) for key in raw if key not in _FIELDS)
    if unknown:
        raise FeedbackError(f"{where}: unknown keys {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    name = _optional_text(raw, "name", where)
    if name is None:
        raise FeedbackError(f"{where}: name: is required (the reward name, e.g. thumbs_up)")
    value = raw.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FeedbackError(f"{where}: value: {value!r} must be a finite number")
    trace_id = _optional_text(raw, "trace_id", where)
    if trace_id is not None and not _TRACE_ID.fullmatch(trace_id):
        raise FeedbackError(f"{where}: trace_id: {trace_id!r} must be 32 lowercase hex digits")
    rollout_id = _optional_text(raw, "rollout_id", where)
    if trace_id is None and rollout_id is None:
        raise FeedbackError(f"{where}: needs rollout_id or trace_id (which run the feedback is about)")
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise FeedbackError(f"{where}: attributes: {attributes!r} must map strings to strings")
    return FeedbackItem(
        feedback_id=_optional_text(raw, "feedback_id", where) or uuid.uuid4().hex,
        trace_id=trace_id,
        rollout_id=rollout_id,
        name=name,
        value=float(value),
        time=_time(raw.get("time"), where, now or dt.datetime.now(dt.UTC)),
        source=_optional_text(raw, "source", where),
        attributes=dict(attributes),
    )


def check_dates(items: Sequence[FeedbackItem], bound: int = MAX_FEEDBACK_DATES) -> None:
    """Raise ``FeedbackError`` when ``items`` fall on more than ``bound`` dates (one file each)."""
    dates = {item.time.date() for item in items}
    if len(dates) > bound:
        raise FeedbackError(
            f"the items fall on {len(dates)} different dates; at most {bound} per request (each date is a "
            "partition with a file of its own): send the others in more requests"
        )


def _table(items: Sequence[FeedbackItem]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in _FIELDS}
    for item in items:
        for name in _FIELDS:
            value = getattr(item, name)
            columns[name].append(list(value.items()) if name == "attributes" else value)
    return pa.Table.from_pydict(columns, schema=FEEDBACK.schema_with_metadata())


def append_feedback(data_root: str | Path, items: Iterable[FeedbackItem]) -> list[Path]:
    """Append ``items`` to ``<data_root>/feedback``: one new file per ``date`` of their times.

    Returns the files written (none for no items).
    """
    by_date: dict[str, list[FeedbackItem]] = {}
    for item in items:
        by_date.setdefault(item.time.date().isoformat(), []).append(item)
    root = Path(data_root) / FEEDBACK.name
    return [
        write_parquet_atomically(
            _table(by_date[date]),
            partition_directory(root, FEEDBACK.partition_columns, (date,)),
            f"feedback-{uuid.uuid4().hex}.parquet",
            COMPRESSION,
        )
        for date in sorted(by_date)
    ]
