"""``spans stats`` counts what is in Parquet and says what still waits in the spool."""

from pathlib import Path

from support.capture import installed_capture

import tracelearn
from tracelearn.collector.span_stats import spans_stats


def test_stats_report_spooled_rollouts_until_their_files_roll(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_SECONDS=3600):
        with tracelearn.rollout(task_id="t-1"):
            tracelearn.emit_reward(1.0)
        during = spans_stats(tmp_path)
    after = spans_stats(tmp_path)
    assert during.spool_segments == 1 and during.spool_bytes > 0 and during.rollouts == 0
    assert after.spool_segments == 0 and after.rollouts == 1 and after.rollouts_with_reward == 1
