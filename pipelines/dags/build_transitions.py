"""Spans -> rollouts + transitions, scheduled by new spans (Airflow 3 TaskFlow).

Thin wiring only: every task calls ``tracelearn.pipelines`` with paths and a config path; the data
never goes through XCom (``build`` returns the written file paths and the summary counts).

Params (defaults come from the environment when the DAG file is parsed):
  data:   dataset root, spans under ``<data>/spans/`` (``$TRACELEARN_DATA``, default ``./data``)
  output: where rollouts and transitions are written (default: the data root)
  config: ``pipeline.yaml`` (``$TRACELEARN_PIPELINE_CONFIG``; empty: the built-in defaults)
  date:   the spans date partition to build (default: the run's logical date, ``ds``)

Run once without a scheduler:
  AIRFLOW__CORE__DAGS_FOLDER=<repo>/pipelines/dags TRACELEARN_DATA=./data \
    airflow dags test tracelearn_build_transitions 2026-11-21
"""

import logging
import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

SPANS = Asset(name="tracelearn_spans", uri="tracelearn://spans")
TRANSITIONS = Asset(name="tracelearn_transitions", uri="tracelearn://transitions")

RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="tracelearn_build_transitions",
    schedule=[SPANS],
    start_date=None,
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["tracelearn"],
    params={
        "data": Param(os.environ.get("TRACELEARN_DATA", "./data"), type="string", description="dataset root"),
        "output": Param("", type="string", description="output root (empty: the data root)"),
        "config": Param(
            os.environ.get("TRACELEARN_PIPELINE_CONFIG", ""),
            type="string",
            description="pipeline.yaml (empty: built-in defaults)",
        ),
        "date": Param("", type="string", description="spans date partition YYYY-MM-DD (empty: the logical date)"),
    },
    doc_md=__doc__,
)
def tracelearn_build_transitions() -> None:
    @task
    def validate_config() -> dict[str, str | None]:
        """Load and validate the config before touching any data; a bad config fails without retries."""
        from tracelearn.pipelines.config import PipelineConfigError, config_hash, load_config

        path = get_current_context()["params"]["config"] or None
        try:
            return {"config": path, "config_hash": config_hash(load_config(path))}
        except PipelineConfigError as exc:
            raise AirflowFailException(str(exc)) from exc

    @task(inlets=[SPANS], outlets=[TRANSITIONS])
    def build(validated: dict[str, str | None]) -> dict[str, Any]:
        """Build rollouts and transitions for one date partition; returns file paths and counts only."""
        from tracelearn.pipelines.build import build_transitions
        from tracelearn.pipelines.config import load_config

        context = get_current_context()
        params = context["params"]
        date = params["date"] or context.get("ds")  # asset-triggered runs have no logical date
        result = build_transitions(
            f"{params['data']}/spans",
            params["output"] or params["data"],
            load_config(validated["config"]),
            date=date,
        )
        return {
            "transitions_files": [str(path) for path in result.transitions_files],
            "rollouts_files": [str(path) for path in result.rollouts_files],
            "summary": dict(result.summary),
            "config_hash": result.config_hash,
            "date": date,
        }

    @task
    def report(built: dict[str, Any]) -> None:
        """Log what was built."""
        log.info("date %s, config %s", built["date"], built["config_hash"])
        for key, value in sorted(built["summary"].items()):
            log.info("  %s: %s", key, value)
        for path in built["transitions_files"] + built["rollouts_files"]:
            log.info("  wrote %s", path)

    report(build(validate_config()))


tracelearn_build_transitions()
