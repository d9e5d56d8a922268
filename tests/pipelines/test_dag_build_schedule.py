"""The build DAG runs on new spans and on its timetable: an ``AssetOrTimeSchedule`` whose cron comes from
``TRACELEARN_BUILD_SCHEDULE``, read the way the scheduler reads it (the serialized timetable's next run).
Airflow runs in a subprocess with a temporary ``AIRFLOW_HOME``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tracelearn.cli.airflow_local import DAGS_FOLDER, airflow_env

NEXT_RUN = """
import json
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.decoders import decode_timetable
from airflow.serialization.encoders import encode_timetable
from airflow.timetables.base import TimeRestriction

bag = DagBag(dag_folder=%r)
dag = bag.dags.get("tracelearn_build_transitions")
result = {"errors": [str(error)[-400:] for error in bag.import_errors.values()]}
if dag is not None:
    timetable = decode_timetable(encode_timetable(dag.timetable))  # what the scheduler works with
    info = timetable.next_dagrun_info(last_automated_data_interval=None,
                                      restriction=TimeRestriction(earliest=None, latest=None, catchup=False))
    result.update(kind=type(timetable).__name__, description=timetable.description,
                  run_after=info.run_after.isoformat() if info else None,
                  assets=sorted(str(asset.uri) for _, asset in timetable.asset_condition.iter_assets()))
print(json.dumps(result))
"""


def next_run(home: Path, settings: dict[str, str]) -> dict[str, object]:
    completed = subprocess.run([sys.executable, "-c", NEXT_RUN % str(DAGS_FOLDER)], env=airflow_env(home, settings),
                               capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_new_spans_or_the_hour_start_a_build(tmp_path: Path) -> None:
    default = next_run(tmp_path / "default", {})
    assert default["errors"] == [] and default["kind"] == "AssetOrTimeSchedule", default
    assert default["description"] == "Triggered by assets or Every hour"
    assert default["assets"] == ["tracelearn://spans/"]
    run_after = str(default["run_after"])
    assert run_after.endswith(":00:00+00:00"), run_after  # due on the hour even when no asset event comes

    every_quarter = next_run(tmp_path / "quarter", {"TRACELEARN_BUILD_SCHEDULE": "*/15 * * * *"})
    assert every_quarter["description"] == "Triggered by assets or Every 15 minutes", every_quarter
    assert str(every_quarter["run_after"])[14:16] in {"00", "15", "30", "45"}

    assets_only = next_run(tmp_path / "off", {"TRACELEARN_BUILD_SCHEDULE": "off"})
    assert assets_only["kind"] == "AssetTriggeredTimetable" and assets_only["run_after"] is None, assets_only


@pytest.mark.slow
def test_a_schedule_that_is_no_cron_expression_is_an_import_error_naming_the_variable(tmp_path: Path) -> None:
    broken = next_run(tmp_path, {"TRACELEARN_BUILD_SCHEDULE": "every hour"})
    assert "kind" not in broken
    (error,) = broken["errors"]  # type: ignore[misc]
    assert "TRACELEARN_BUILD_SCHEDULE='every hour' is not a cron expression" in str(error)
