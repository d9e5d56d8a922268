"""Transitions -> train -> publish candidate -> evaluate -> gate (Airflow 3 TaskFlow), scheduled by new transitions.

Thin wiring only: every task is one call of ``tracelearn.training`` (``train_steps``, ``gate``) with
paths and params, plus logging; XCom carries paths, versions and numbers, never data.

    validate -> backend -> train_torch ----------------------------\\
                       \\-> prepare_verl -> run_verl -> verl_checkpoint -> publish_candidate -> evaluate -> gate

``train_torch`` trains in the worker's own environment (CPU, or the worker's GPU). The verl branch
keeps the scheduler's environment light: ``prepare_verl`` writes the job (verl's Parquet, overrides,
``launch.sh``) here, and ``run_verl`` runs it through Airflow's external-Python operator in verl's own
environment (``$TRACELEARN_VERL_PYTHON`` when the DAG file is parsed; verl pins its own torch and
vLLM). On Kubernetes, replace ``run_verl`` by a ``KubernetesPodOperator`` running the same
``launch.sh`` from an image with verl, with the run directory on a shared volume.

``evaluate`` serves the candidate and the current production version in turn and runs the agent on
the same held-out tasks and seeds (``tracelearn.training.evaluate``); ``gate`` promotes the candidate
to production only if it beats production by ``margin`` and records why either way (``gate.json``).

Params (defaults from the environment when the file is parsed):
  transitions: a build output root or its transitions/ (``$TRACELEARN_DATA``, default ``./data``)
  config_hash: pipeline config hash prefix when the transitions hold several
  model: the policy to start from (default ``registry:<name>@production``)
  name: the registry artifact the candidate is published under (``calc-policy``)
  registry: registry location (``$TRACELEARN_REGISTRY``; empty: the default)
  runs: where run directories go (``./runs``); each run writes ``<runs>/<dag run id>/``
  trainer: grpo | sft;  backend: torch | verl;  train_config: train.yaml (empty: defaults);  lora: e.g. r=16
  agent, eval_tasks, eval_pipeline (required: the agent command, its held-out tasks and the pipeline.yaml
    whose reward scores them; the calc example's are under examples/calc/ in a clone),
  eval_samples, eval_seed, eval_limit (0: all), eval_concurrency (agent requests in flight)
  margin: success-rate points (as a fraction) the candidate must gain to be promoted

Every task stops after ``$TRACELEARN_TRAIN_TASK_TIMEOUT_MINUTES`` minutes (its ``execution_timeout``, read when
the file is parsed; default 1440, for a training run or an evaluation): a task that hangs fails, and is
retried, instead of holding a worker slot.

Run once without a scheduler:
  AIRFLOW__CORE__DAGS_FOLDER=<repo>/pipelines/dags TRACELEARN_DATA=./data \\
    airflow dags test tracelearn_train --conf '{"agent": "python examples/calc/agent.py",
      "eval_tasks": "examples/calc/tasks_heldout.jsonl", "eval_pipeline": "examples/calc/pipeline.yaml"}'
"""

import logging
import os
import re
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from tracelearn.settings.variables import DATA_ROOT, REGISTRY, RUNS, TRAIN_TASK_TIMEOUT
from tracelearn.settings.variables import VERL_PYTHON as VERL_PYTHON_SETTING

log = logging.getLogger(__name__)

TASK_TIMEOUT = timedelta(minutes=TRAIN_TASK_TIMEOUT.value())

TRANSITIONS = Asset(name="tracelearn_transitions", uri="tracelearn://transitions")
CHECKPOINTS = Asset(name="tracelearn_checkpoints", uri="tracelearn://registry/checkpoints")
# The external-Python task needs an interpreter when the file is parsed; without the setting it is this
# one, where launch.sh's verl version check then fails the task saying how to make verl's environment.
VERL_PYTHON = VERL_PYTHON_SETTING.text() or sys.executable


def _run_directory(params: dict[str, Any], run_id: str) -> Path:
    # Airflow run ids hold ':' and '+' (manual__2026-11-21T00:00:00+00:00): keep them path-safe.
    return Path(params["runs"]) / re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id)


def _registry(params: dict[str, Any]) -> Any:
    from tracelearn.registry import open_registry

    return open_registry(params["registry"] or None)


def _train_config(params: dict[str, Any]) -> Any:
    from tracelearn.training.train_steps import train_config_from

    return train_config_from(params["train_config"] or None, params["lora"] or None)


def _eval_spec(params: dict[str, Any]) -> Any:
    """The held-out evaluation the params describe (``tracelearn.training.eval_inputs.EvalSpec``)."""
    from tracelearn.training.eval_inputs import EvalSpec

    missing = [name for name in ("agent", "eval_tasks", "eval_pipeline") if not params[name]]
    if missing:
        raise ValueError(f"params {', '.join(missing)} are required (the agent command, its held-out tasks and "
                         "the pipeline.yaml whose reward scores them)")
    return EvalSpec(agent=tuple(shlex.split(params["agent"])), tasks=Path(params["eval_tasks"]),
                    pipeline_config=Path(params["eval_pipeline"]), samples=params["eval_samples"],
                    seed=params["eval_seed"], limit=params["eval_limit"] or None,
                    concurrency=params["eval_concurrency"])


@dag(
    dag_id="tracelearn_train",
    schedule=[TRANSITIONS],
    start_date=None,
    catchup=False,
    max_active_runs=1,
    default_args={"execution_timeout": TASK_TIMEOUT},
    tags=["tracelearn"],
    params={
        "transitions": Param(DATA_ROOT.text(), type="string"),
        "config_hash": Param("", type="string"),
        "model": Param("", type="string", description="empty: registry:<name>@production"),
        "name": Param("calc-policy", type="string"),
        "registry": Param(REGISTRY.text() if REGISTRY.is_set() else "", type="string"),
        "runs": Param(RUNS.text(), type="string"),
        "trainer": Param("grpo", enum=["grpo", "sft"]),
        "backend": Param("torch", enum=["torch", "verl"]),
        "train_config": Param("", type="string"),
        "lora": Param("", type="string"),
        "agent": Param("", type="string", description="the agent command (required)"),
        "eval_tasks": Param("", type="string", description="held-out tasks, JSONL (required)"),
        "eval_pipeline": Param("", type="string", description="pipeline.yaml whose reward scores them (required)"),
        "eval_samples": Param(4, type="integer", minimum=1),
        "eval_seed": Param(0, type="integer"),
        "eval_limit": Param(0, type="integer", minimum=0),
        "eval_concurrency": Param(4, type="integer", minimum=1),
        "margin": Param(0.0, type="number", minimum=0, maximum=0.99),
    },
    doc_md=__doc__,
)
def tracelearn_train() -> None:
    @task
    def validate() -> dict[str, Any]:
        """Check the train config, the transitions, the registry and the evaluation's spec before any model loads."""
        from tracelearn.registry import RegistryError
        from tracelearn.schemas.dataset import DatasetError
        from tracelearn.training.config import TrainConfigError
        from tracelearn.training.data import NoTrainingDataError
        from tracelearn.training.train_steps import check_training_inputs

        context = get_current_context()
        params = context["params"]
        try:
            _eval_spec(params)
            inputs = check_training_inputs(params["transitions"], params["config_hash"] or None,
                                           _train_config(params), _registry(params))
        except (TrainConfigError, DatasetError, NoTrainingDataError, RegistryError, ValueError) as exc:
            raise AirflowFailException(str(exc)) from exc
        log.info("%d transitions of pipeline config %s", inputs.rows, inputs.config_hash[:12])
        return {"run": str(_run_directory(params, context["run_id"])), "config_hash": inputs.config_hash,
                "train_config_hash": inputs.train_config_hash, "rows": inputs.rows,
                "model": params["model"] or f"registry:{params['name']}@production"}

    @task.branch
    def backend() -> str:
        return "prepare_verl" if get_current_context()["params"]["backend"] == "verl" else "train_torch"

    @task(inlets=[TRANSITIONS])
    def train_torch(validated: dict[str, Any]) -> dict[str, str]:
        """GRPO or SFT in this worker; returns the checkpoint and its lineage file."""
        from tracelearn.training.train_steps import train_policy

        params = get_current_context()["params"]
        result = train_policy(params["trainer"], params["transitions"], validated["model"], validated["run"],
                              _train_config(params), config_hash=validated["config_hash"],
                              registry=_registry(params), progress=False)
        log.info("trained %s steps: %s", result.summary["steps"], result.summary["final"])
        return {"checkpoint": str(result.checkpoint), "lineage": str(result.run.lineage_path)}

    @task(inlets=[TRANSITIONS])
    def prepare_verl(validated: dict[str, Any]) -> str:
        """Write the verl job (data, overrides, launch.sh) under the run directory; returns its directory."""
        from tracelearn.training.train_steps import prepare_verl_training

        params = get_current_context()["params"]
        job = prepare_verl_training(params["transitions"], validated["run"], validated["model"],
                                    _train_config(params), config_hash=validated["config_hash"],
                                    registry=_registry(params))
        log.info("verl job written to %s", job)
        return str(job)

    @task.external_python(python=VERL_PYTHON, expect_airflow=False)
    def run_verl(job_directory: str) -> int:
        """In verl's environment: run the job's launch.sh with that environment's python."""
        import subprocess
        import sys

        env = {**os.environ, "TRACELEARN_VERL_PYTHON": sys.executable}
        return subprocess.run(["bash", f"{job_directory}/launch.sh"], env=env, check=True).returncode

    @task
    def verl_checkpoint(job_directory: str, validated: dict[str, Any], _status: int) -> dict[str, str]:
        """The verl job's last checkpoint and a lineage naming the data it trained on."""
        from tracelearn.training.train_steps import verl_training_result

        params = get_current_context()["params"]
        checkpoint, lineage = verl_training_result(
            job_directory, validated["run"], params["transitions"], model=validated["model"],
            config_hash=validated["config_hash"], train_config_hash=validated["train_config_hash"],
            lora=bool(params["lora"]))
        log.info("verl checkpoint %s", checkpoint)
        return {"checkpoint": str(checkpoint), "lineage": str(lineage)}

    @task(trigger_rule="none_failed_min_one_success", outlets=[CHECKPOINTS])
    def publish_candidate(torch_run: dict[str, str] | None, verl_run: dict[str, str] | None) -> int:
        """Publish the trained checkpoint with its lineage and point ``candidate`` at it; returns the version."""
        from tracelearn.training.gate import publish_run

        params = get_current_context()["params"]
        trained = torch_run or verl_run
        assert trained is not None, "one training branch ran"
        version = publish_run(_registry(params), params["name"], Path(trained["checkpoint"]), Path(trained["lineage"]))
        log.info("published %s as candidate", version.ref)
        return version.version

    @task
    def evaluate(version: int, validated: dict[str, Any]) -> str:
        """Evaluate the candidate and production on the same tasks and seeds; write and return the decision."""
        from tracelearn.training.gate import GateConfig, evaluate_for_gate

        params = get_current_context()["params"]
        workdir = Path(validated["run"]) / "gate"
        decision = evaluate_for_gate(_registry(params), params["name"], version, _eval_spec(params), workdir,
                                     GateConfig(margin=float(params["margin"])))
        log.info("decision: %s", decision.reason)
        return str(decision.write(workdir / "decision.json"))

    @task
    def gate(version: int, decision_path: str) -> dict[str, Any]:
        """Promote the candidate if the decision says so; gate.json records why either way."""
        from tracelearn.training.gate import apply_decision_file

        params = get_current_context()["params"]
        applied = apply_decision_file(_registry(params), params["name"], version, Path(decision_path))
        log.info("%s: %s", "promoted" if applied.promote else "not promoted", applied.reason)
        return {"promoted": applied.promote, "reason": applied.reason}

    # Wiring: each call returns the task's XComArg, which Airflow resolves to its value when the task runs.
    validated: Any = validate()
    chosen = backend()
    torch_run: Any = train_torch(validated)
    job: Any = prepare_verl(validated)
    verl_status: Any = run_verl(job)
    verl_run: Any = verl_checkpoint(job, validated, verl_status)
    validated >> chosen >> [torch_run, job]
    version: Any = publish_candidate(torch_run, verl_run)
    decision: Any = evaluate(version, validated)
    gate(version, decision)


tracelearn_train()
