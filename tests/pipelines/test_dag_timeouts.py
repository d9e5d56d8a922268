"""Every task of every DAG has an ``execution_timeout``, set from the environment when the file is parsed:
a task that hangs (a reward function, a stage, a server that never answers) fails instead of holding a
worker forever. Airflow runs in a subprocess with a temporary ``AIRFLOW_HOME``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tracelearn.cli.airflow_local import DAGS_FOLDER, airflow_env

LIST_TIMEOUTS = """
import json
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=%r)
print(json.dumps({
    "errors": {path: str(error)[-300:] for path, error in bag.import_errors.items()},
    "timeouts": {dag_id: {task.task_id: task.execution_timeout.total_seconds() if task.execution_timeout else None
                          for task in dag.tasks} for dag_id, dag in bag.dags.items()},
}))
"""
VARIABLES = {
    "tracelearn_build_transitions": "TRACELEARN_BUILD_TASK_TIMEOUT_MINUTES",
    "tracelearn_train": "TRACELEARN_TRAIN_TASK_TIMEOUT_MINUTES",
    "tracelearn_apo": "TRACELEARN_APO_TASK_TIMEOUT_MINUTES",
    "tracelearn_loop": "TRACELEARN_LOOP_TASK_TIMEOUT_MINUTES",
}


def parse_dags(home: Path, settings: dict[str, str]) -> dict[str, dict[str, object]]:
    completed = subprocess.run([sys.executable, "-c", LIST_TIMEOUTS % str(DAGS_FOLDER)],
                               env=airflow_env(home, settings), capture_output=True, text=True, timeout=300,
                               check=True)
    result: dict[str, dict[str, object]] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_every_task_has_the_configured_execution_timeout(tmp_path: Path) -> None:
    defaults = parse_dags(tmp_path / "defaults", {})
    assert defaults["errors"] == {}
    assert set(defaults["timeouts"]) == set(VARIABLES)
    expected = {"tracelearn_build_transitions": 120 * 60, "tracelearn_train": 1440 * 60, "tracelearn_apo": 720 * 60,
                "tracelearn_loop": 1440 * 60}
    for dag_id, tasks in defaults["timeouts"].items():
        assert isinstance(tasks, dict) and tasks, dag_id
        assert set(tasks.values()) == {expected[dag_id]}, (dag_id, tasks)

    tuned = parse_dags(tmp_path / "tuned", {variable: "7.5" for variable in VARIABLES.values()})
    for dag_id, tasks in tuned["timeouts"].items():
        assert isinstance(tasks, dict) and set(tasks.values()) == {450.0}, (dag_id, tasks)


def test_a_bad_timeout_is_an_import_error_naming_the_variable(tmp_path: Path) -> None:
    parsed = parse_dags(tmp_path, {"TRACELEARN_BUILD_TASK_TIMEOUT_MINUTES": "two hours"})
    errors = parsed["errors"]
    assert isinstance(errors, dict) and len(errors) == 1
    (message,) = errors.values()
    assert "TRACELEARN_BUILD_TASK_TIMEOUT_MINUTES='two hours' is not a number of minutes > 0" in message
    assert "tracelearn_build_transitions" not in parsed["timeouts"]
