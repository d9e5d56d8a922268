"""Which spans date partitions one run of the build DAG builds: asked, named by asset events, the run's
logical date and the day before, or every partition."""

import datetime as dt
from pathlib import Path

from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build_dates import dates_named_by_events, dates_to_build

DAY = dt.timedelta(days=1)


def spans_on(data: Path, *offsets: dt.timedelta) -> None:
    """One LLM span on each of the days ``at(0) + offset`` (the dataset is partitioned by start date)."""
    factory = SpansFactory(data / "spans")
    for number, offset in enumerate(offsets, start=1):
        factory.llm(number, None, offset.total_seconds(), f"question {number}")
    factory.write()


def test_the_order_of_sources(tmp_path: Path) -> None:
    spans_on(tmp_path, dt.timedelta(0), DAY, 2 * DAY, 5 * DAY)
    first = at(0).date()
    every = [(first + days * DAY).isoformat() for days in (0, 1, 2, 5)]
    assert dates_to_build(tmp_path) == every
    assert dates_to_build(tmp_path, requested="2030-01-01") == ["2030-01-01"]
    named = [{"dates": [every[2], every[0]]}, None, {"date": every[2]}]
    assert dates_to_build(tmp_path, event_extras=named, logical_date=at(0)) == [every[0], every[2]]
    # A scheduled run at 00:30 on day 2: rollouts of day 1 that closed after midnight, and day 2 so far.
    scheduled = dt.datetime.combine(first + 2 * DAY, dt.time(0, 30), tzinfo=dt.UTC)
    assert dates_to_build(tmp_path, event_extras=[{}], logical_date=scheduled) == [every[1], every[2]]
    # A day without spans is not built (a scheduled run with nothing new builds nothing).
    assert dates_to_build(tmp_path, logical_date=scheduled + 2 * DAY) == []


def test_event_extras_without_dates_name_none() -> None:
    assert dates_named_by_events([None, {}, {"other": 1}]) == []
    assert dates_named_by_events([{"date": "2026-11-21"}, {"dates": ["2026-11-20", "2026-11-21"]}]) == [
        "2026-11-20", "2026-11-21"]
