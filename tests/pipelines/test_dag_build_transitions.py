"""The ``tracelearn_build_transitions`` DAG parses cleanly and builds transitions with ``dag.test()``.

Airflow runs in a subprocess with a temporary ``AIRFLOW_HOME`` (see ``support.airflow_home``).
"""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.airflow_home import run_dag_test
from support.spans_factory import SpansFactory

DAG_ID = "tracelearn_build_transitions"
LOGICAL_DATE = "2026-11-21T12:00:00+00:00"  # the spans factory's partition date


def write_spans(data: Path) -> None:
    factory = SpansFactory(data / "spans")
    for trace, (task, value) in enumerate([("t1", 1.0), ("t1", 0.0), ("t2", 0.5)], start=1):
        root = factory.root(trace, 0, 100, task_id=task)
        factory.llm(trace, root, 1, user=f"{task}: 2+2?", task_id=task)
        factory.tool(trace, root, 2, task_id=task)
        factory.llm(trace, root, 3, user=f"{task}: and then?", task_id=task)
        factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


@pytest.mark.slow
def test_dag_parses_and_builds_transitions_from_spans(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_spans(data)
    out = tmp_path / "out"
    result = run_dag_test(
        tmp_path / "airflow",
        DAG_ID,
        LOGICAL_DATE,
        conf={"output": str(out), "watermark": "2026-11-22T00:00:00+00:00"},
        env={"TRACELEARN_DATA": str(data)},
    )
    assert result.returncode == 0, result.output[-4000:]
    assert result.state == "success" and DAG_ID in result.dag_ids
    transitions = sorted((out / "transitions").rglob("*.parquet"))
    assert transitions, sorted(str(path.relative_to(tmp_path)) for path in out.rglob("*"))
    assert sum(pq.read_metadata(path).num_rows for path in transitions) == 6
    assert sorted((out / "rollouts").rglob("*.parquet"))


@pytest.mark.slow
def test_a_bad_config_fails_the_run_before_any_data_is_written(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_spans(data)
    config = tmp_path / "pipeline.yaml"
    config.write_text("credit:\n  method: no-such-method\n", encoding="utf-8")
    result = run_dag_test(
        tmp_path / "airflow",
        DAG_ID,
        LOGICAL_DATE,
        env={"TRACELEARN_DATA": str(data), "TRACELEARN_PIPELINE_CONFIG": str(config)},
    )
    assert result.returncode != 0 and result.state == "failed", result.output[-4000:]
    assert "no-such-method" in result.output
    assert not (data / "transitions").exists() and not (data / "rollouts").exists()
