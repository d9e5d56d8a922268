"""Feedback rows: validated, appended atomically as FEEDBACK Parquet files, read back by the pipeline."""

import datetime as dt
from pathlib import Path

import pytest

from tracelearn.collector.feedback import FeedbackError, append_feedback, feedback_item
from tracelearn.pipelines.rewards import scan_feedback
from tracelearn.schemas.dataset import read_table

WHEN = dt.datetime(2026, 11, 21, 23, 30, tzinfo=dt.UTC)


def test_items_land_in_the_date_partition_of_their_time(tmp_path: Path) -> None:
    items = [
        feedback_item({"rollout_id": "r1", "name": "thumbs", "value": 1, "time": WHEN.isoformat()}),
        feedback_item({"trace_id": "ab" * 16, "name": "thumbs", "value": -1.0, "time": WHEN + dt.timedelta(hours=1)}),
    ]
    files = append_feedback(tmp_path, items)
    assert [f.parent.name for f in files] == ["date=2026-11-21", "date=2026-11-22"]
    table = read_table(tmp_path / "feedback", "feedback")
    assert sorted(table.column("value").to_pylist()) == [-1.0, 1.0]
    assert len(set(table.column("feedback_id").to_pylist())) == 2, "feedback ids default to fresh uuids"
    assert scan_feedback(tmp_path / "feedback").collect().height == 2
    assert scan_feedback(tmp_path / "absent").collect().height == 0


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"name": "thumbs", "value": 1}, "needs rollout_id or trace_id"),
        ({"rollout_id": "r", "value": 1}, "name: is required"),
        ({"rollout_id": "r", "name": "thumbs", "value": float("inf")}, "must be a finite number"),
        ({"rollout_id": "r", "name": "thumbs", "value": True}, "must be a finite number"),
        ({"trace_id": "XYZ", "name": "thumbs", "value": 1}, "32 lowercase hex"),
        ({"rollout_id": "r", "name": "t", "value": 1, "time": "2026-11-21T12:00"}, "needs a time zone"),
        ({"rollout_id": "r", "name": "t", "value": 1, "score": 2}, "unknown keys score"),
    ],
)
def test_invalid_items_are_refused_with_the_field_named(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(FeedbackError, match=fragment):
        feedback_item(raw, "line 3")
