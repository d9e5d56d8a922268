"""Run tracelearn's Airflow DAGs once on this machine, without a scheduler: ``dag.test()`` in a fresh interpreter.

Airflow reads its configuration once per process, so the DAG runs happen in a child interpreter with its
own ``AIRFLOW_HOME`` (SQLite metadata DB, no example DAGs): the caller never imports Airflow and never
sees its global settings. The child initializes the DB once, parses the DAGs folder (an import error
fails the whole call: a DAG that does not parse would never be scheduled either), then tests each
requested DAG in order and stops at the first run that does not succeed. Every output line is written
to the log and handed to ``on_line`` as it arrives, so a long run shows its progress.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracelearn.processes import start_child

DAGS_FOLDER = Path(__file__).resolve().parent.parent / "pipelines" / "dags"
REPORT_PREFIX = "DAG_RUN "

_CHILD = """
import datetime as dt
import json
import sys

from airflow.dag_processing.dagbag import DagBag
from airflow.utils import db

dags_folder, requests = sys.argv[1], json.loads(sys.argv[2])
db.initdb()
bag = DagBag(dag_folder=dags_folder)
if bag.import_errors:
    print("IMPORT_ERRORS " + json.dumps({str(k): str(v) for k, v in bag.import_errors.items()}), flush=True)
    sys.exit(2)
for request in requests:
    dag = bag.get_dag(request["dag_id"])
    if dag is None:
        print("UNKNOWN_DAG " + json.dumps({"dag_id": request["dag_id"], "dag_ids": sorted(bag.dag_ids)}), flush=True)
        sys.exit(2)
    run = dag.test(logical_date=dt.datetime.fromisoformat(request["logical_date"]), run_conf=request["conf"])
    report = {"dag_id": request["dag_id"], "state": str(run.state), "run_id": run.run_id,
              "dag_ids": sorted(bag.dag_ids)}
    print("DAG_RUN " + json.dumps(report), flush=True)
    if str(run.state) != "success":
        sys.exit(3)
"""

# dag.test() logs "[DAG TEST] starting task_id=build map_index=0" and "[DAG TEST] end task task_id=build ...",
# the task instance's final state in a "Task instance state updated ... new_state=success" line before the end.
_TASK_EVENT = re.compile(r"\[DAG TEST\] (?P<event>starting|end task) task_id=(?P<task>[\w.-]+)")
_NEW_STATE = re.compile(r"new_state=(?P<state>\w+)")


@dataclass(frozen=True)
class DagRequest:
    """One DAG run: its id, its params (``run_conf``) and the logical date (ISO 8601 with a zone)."""

    dag_id: str
    conf: dict[str, Any] = field(default_factory=dict)
    logical_date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())


@dataclass(frozen=True)
class DagRunReport:
    """What one ``dag.test()`` ended as."""

    dag_id: str
    state: str
    run_id: str


@dataclass(frozen=True)
class DagTestsResult:
    """The child's exit status, its whole output, and a report per DAG run that finished."""

    returncode: int
    output: str
    runs: list[DagRunReport]
    dag_ids: list[str]

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and all(run.state == "success" for run in self.runs)


def airflow_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a throwaway Airflow: its own home and SQLite DB, no examples, 2 workers."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
    )
    env.update(extra or {})
    return env


class TaskProgress:
    """Turns dag.test()'s output lines into "task started" / "task ended as STATE" messages."""

    def __init__(self) -> None:
        self._last_state = "unknown"

    def message(self, line: str) -> str | None:
        """A one-line progress message for ``line``, or None when it is not a task starting or ending."""
        if state := _NEW_STATE.search(line):
            self._last_state = state["state"]
            return None
        event = _TASK_EVENT.search(line)
        if event is None:
            return None
        if event["event"] == "starting":
            self._last_state = "unknown"
            return f"{event['task']}: started"
        return f"{event['task']}: {self._last_state}"


def run_dags(
    home: Path,
    requests: Sequence[DagRequest],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    log_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> DagTestsResult:
    """``initdb``, the DagBag import check and ``dag.test()`` of each request, in one fresh interpreter.

    Raises ``ChildTimeoutError`` (the child stopped) when the runs take over ``timeout`` seconds.
    """
    home.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([{"dag_id": r.dag_id, "conf": r.conf, "logical_date": r.logical_date} for r in requests])
    lines: list[str] = []

    def take(line: str) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    child = start_child([sys.executable, "-c", _CHILD, str(DAGS_FOLDER), payload], name="the Airflow DAG runs",
                        log=log_path, env=airflow_env(home, env), cwd=home, on_line=take)
    returncode = child.wait(timeout)
    reports = [json.loads(line.removeprefix(REPORT_PREFIX)) for line in lines if line.startswith(REPORT_PREFIX)]
    return DagTestsResult(
        returncode=returncode,
        output="\n".join(lines),
        runs=[DagRunReport(r["dag_id"], r["state"], r["run_id"]) for r in reports],
        dag_ids=reports[-1]["dag_ids"] if reports else [],
    )
