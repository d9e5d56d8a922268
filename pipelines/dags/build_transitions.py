"""Spans -> rollouts + transitions, scheduled by new spans or on a timetable (Airflow 3 TaskFlow).

Thin wiring only: every task calls ``tracelearn.pipelines`` with paths and a config path; the data
never goes through XCom (``build`` returns the written file paths and the summary counts).

Schedule: an ``AssetOrTimeSchedule``. A ``tracelearn_spans`` asset event starts a run at once (a
deployment emits one after its collector rolls or compacts a spans file: docs/pipeline.md shows the
Airflow REST call), and the timetable ``$TRACELEARN_BUILD_SCHEDULE`` (a cron expression in UTC,
default ``@hourly``, read when the file is parsed; ``off``: asset events only) builds new spans even
when nothing emits an event. A scheduled run builds its logical date and the day before.

Params (defaults come from the environment when the DAG file is parsed):
  data:   dataset root, spans under ``<data>/spans/`` (``$TRACELEARN_DATA``, default ``./data``)
  output: where rollouts and transitions are written (default: the data root)
  config: ``pipeline.yaml`` (``$TRACELEARN_PIPELINE_CONFIG``; empty: the built-in defaults)
  date:   the spans date partition to build; empty: the dates named by the triggering asset events
          (``extra={"date": ...}`` or ``{"dates": [...]}``), else the run's logical date and the day
          before (those holding spans), else every date partition of the spans dataset (asset-triggered
          runs have no logical date); ``tracelearn.pipelines.build_dates`` says why
  watermark: build time for the lateness watermark (ISO 8601 with zone; empty: now). Set it to
          rebuild a partition exactly as an earlier run did.

Each date is built by its own mapped ``build`` task instance, retried on its own.

Every task stops after ``$TRACELEARN_BUILD_TASK_TIMEOUT_MINUTES`` minutes (its ``execution_timeout``, read when
the file is parsed; default 120, for a build of one date partition): a task that hangs fails, and is
retried, instead of holding a worker slot.

Run once without a scheduler:
  AIRFLOW__CORE__DAGS_FOLDER=<repo>/pipelines/dags TRACELEARN_DATA=./data \
    airflow dags test tracelearn_build_transitions 2026-11-21
"""

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException

from tracelearn.settings.variables import BUILD_SCHEDULE, BUILD_TASK_TIMEOUT, DATA_ROOT, PIPELINE_CONFIG

log = logging.getLogger(__name__)

TASK_TIMEOUT = timedelta(minutes=BUILD_TASK_TIMEOUT.value())

SPANS = Asset(name="tracelearn_spans", uri="tracelearn://spans")
TRANSITIONS = Asset(name="tracelearn_transitions", uri="tracelearn://transitions")

RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30)}
BUILD_CRON = BUILD_SCHEDULE.value()
SCHEDULE: Any = [SPANS] if BUILD_CRON == "off" else AssetOrTimeSchedule(
    timetable=CronTriggerTimetable(BUILD_CRON, timezone="UTC"), assets=SPANS)


@dag(
    dag_id="tracelearn_build_transitions",
    schedule=SCHEDULE,
    start_date=None,
    catchup=False,
    max_active_runs=1,
    default_args={**RETRIES, "execution_timeout": TASK_TIMEOUT},
    tags=["tracelearn"],
    params={
        "data": Param(DATA_ROOT.text(), type="string", description="dataset root"),
        "output": Param("", type="string", description="output root (empty: the data root)"),
        "config": Param(
            PIPELINE_CONFIG.text() or "",
            type="string",
            description="pipeline.yaml (empty: built-in defaults)",
        ),
        "date": Param("", type="string", description="spans date partition YYYY-MM-DD (empty: see the docs)"),
        "watermark": Param("", type="string", description="watermark build time, ISO 8601 (empty: now)"),
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

    @task
    def dates_to_build() -> list[str]:
        """The date partitions this run builds (``tracelearn.pipelines.build_dates``)."""
        from tracelearn.pipelines.build_dates import dates_to_build as dates_of_run

        context = get_current_context()
        params = context["params"]
        events = (context.get("triggering_asset_events") or {}).values()
        dates = dates_of_run(params["data"], requested=params["date"] or None,
                             event_extras=[event.extra for batch in events for event in batch],
                             logical_date=context.get("logical_date"))
        log.info("building date partitions: %s", ", ".join(dates) or "none (no spans for this run)")
        return dates

    @task(inlets=[SPANS], outlets=[TRANSITIONS])
    def build(date: str, validated: dict[str, str | None]) -> dict[str, Any]:
        """Build rollouts and transitions for one date partition; returns file paths and counts only."""
        from tracelearn.pipelines.build import build_transitions
        from tracelearn.pipelines.config import load_config

        params = get_current_context()["params"]
        try:
            now = datetime.fromisoformat(params["watermark"]) if params["watermark"] else datetime.now(UTC)
        except ValueError as exc:
            raise AirflowFailException(f"watermark {params['watermark']!r} is not an ISO 8601 time") from exc
        if now.tzinfo is None:
            raise AirflowFailException(f"watermark {params['watermark']!r} has no time zone; add +00:00")
        result = build_transitions(
            f"{params['data']}/spans",
            params["output"] or params["data"],
            load_config(validated["config"]),
            date=date,
            now=now,
        )
        return {
            "transitions_files": [str(path) for path in result.transitions_files],
            "rollouts_files": [str(path) for path in result.rollouts_files],
            "summary": dict(result.summary),
            "config_hash": result.config_hash,
            "date": date,
            "watermark": now.isoformat(),
        }

    @task
    def report(builds: list[dict[str, Any]]) -> None:
        """Log what each date's build wrote and counted."""
        for built in builds:
            log.info("date %s, config %s, watermark %s", built["date"], built["config_hash"], built["watermark"])
            for key, value in sorted(built["summary"].items()):
                log.info("  %s: %s", key, value)
            for path in built["transitions_files"] + built["rollouts_files"]:
                log.info("  wrote %s", path)

    # Wiring: the XComArgs are resolved to values when the tasks run (one build per date, mapped).
    validated = validate_config()
    builds: Any = build.partial(validated=validated).expand(date=dates_to_build())
    report(builds)


tracelearn_build_transitions()
