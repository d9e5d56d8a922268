"""Run an Airflow DAG once, in a subprocess, against a temporary ``AIRFLOW_HOME`` (SQLite, no scheduler).

A thin test-facing wrapper over ``tracelearn.cli.airflow_local`` (what ``tracelearn demo`` uses too):
the pytest process never imports Airflow and never sees its global settings.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracelearn.cli.airflow_local import DagRequest, run_dags


@dataclass(frozen=True)
class DagTestResult:
    returncode: int
    output: str
    state: str | None
    dag_ids: list[str]


def run_dag_test(
    home: Path,
    dag_id: str,
    logical_date: str,
    conf: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> DagTestResult:
    """``initdb`` + DagBag import check + ``dag.test()`` of one DAG in a fresh interpreter."""
    result = run_dags(home, [DagRequest(dag_id, conf or {}, logical_date)], env=env, timeout=timeout)
    state = result.runs[0].state if result.runs else None
    return DagTestResult(result.returncode, result.output, state, result.dag_ids)
