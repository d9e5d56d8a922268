"""Which spans date partitions one run of the build DAG builds (``tracelearn_build_transitions``).

The DAG runs on new spans (an asset event on ``tracelearn_spans``) or on its timetable
(``TRACELEARN_BUILD_SCHEDULE``); :func:`dates_to_build` picks, in this order:

1. the date the run asks for (its ``date`` param);
2. the dates the triggering asset events name (``extra={"date": ...}`` or ``{"dates": [...]}``);
3. for a run with a logical date (a scheduled run, ``airflow dags test DAG DATE``): that date and the
   day before, those that hold spans; the day before because a rollout that started before midnight
   closes (its watermark passes) after it, and a rebuilt partition replaces its output, so building it
   again is safe;
4. every date partition of the spans dataset (an asset event that names none).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tracelearn.pipelines.spans_input import spans_dates

__all__ = ["dates_named_by_events", "dates_to_build"]


def dates_named_by_events(extras: Iterable[Mapping[str, Any] | None]) -> list[str]:
    """The dates asset events name in their ``extra`` (``date`` or ``dates``), sorted, each once."""
    named: set[str] = set()
    for extra in extras:
        extra = extra or {}
        named.update([extra["date"]] if "date" in extra else extra.get("dates", []))
    return sorted(named)


def dates_to_build(spans_root: str | Path, *, requested: str | None = None,
                   event_extras: Iterable[Mapping[str, Any] | None] = (),
                   logical_date: dt.datetime | None = None) -> list[str]:
    """The date partitions (``YYYY-MM-DD``) one build run covers (see the module docstring for the order)."""
    if requested:
        return [requested]
    named = dates_named_by_events(event_extras)
    if named:
        return named
    present = spans_dates(spans_root)
    if logical_date is not None:
        day = logical_date.astimezone(dt.UTC).date() if logical_date.tzinfo else logical_date.date()
        recent = {(day - dt.timedelta(days=1)).isoformat(), day.isoformat()}
        return [date for date in present if date in recent]
    return present
