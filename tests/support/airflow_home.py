"""Run an Airflow DAG once, in a subprocess, against a temporary ``AIRFLOW_HOME`` (SQLite, no scheduler).

Airflow reads its configuration once per process, so each run gets a fresh interpreter: the pytest
process never imports Airflow and never sees its global settings.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "pipelines" / "dags"

# Runs in the child: init the metadata DB, parse the DAGs folder, fail on import errors, test one DAG.
_SCRIPT = """
import datetime as dt
import json
import sys

from airflow.dag_processing.dagbag import DagBag
from airflow.utils import db

dag_id, dags_folder, logical_date, conf = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
db.initdb()
bag = DagBag(dag_folder=dags_folder)
if bag.import_errors:
    print("IMPORT_ERRORS " + json.dumps({str(k): str(v) for k, v in bag.import_errors.items()}))
    sys.exit(2)
dag = bag.get_dag(dag_id)
run = dag.test(logical_date=dt.datetime.fromisoformat(logical_date), run_conf=conf)
print("DAG_RUN " + json.dumps({"state": str(run.state), "dag_ids": sorted(bag.dag_ids)}))
sys.exit(0 if str(run.state) == "success" else 3)
"""


@dataclass(frozen=True)
class DagTestResult:
    returncode: int
    output: str
    state: str | None
    dag_ids: list[str]


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


def run_dag_test(
    home: Path,
    dag_id: str,
    logical_date: str,
    conf: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> DagTestResult:
    """``initdb`` + DagBag import check + ``dag.test()`` in a fresh interpreter; parses its report line."""
    home.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, dag_id, str(DAGS_FOLDER), logical_date, json.dumps(conf or {})],
        env=airflow_env(home, env),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = completed.stdout + completed.stderr
    report = next((line for line in completed.stdout.splitlines() if line.startswith("DAG_RUN ")), None)
    parsed = json.loads(report.removeprefix("DAG_RUN ")) if report else {}
    return DagTestResult(completed.returncode, output, parsed.get("state"), parsed.get("dag_ids", []))
