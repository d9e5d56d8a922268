"""Transitions -> automatic prompt optimization -> candidate prompt -> gate (Airflow 3 TaskFlow), scheduled by
new transitions.

Thin wiring only: both tasks call ``tracelearn.training.apo`` with paths and params; XCom carries the
run directory, versions and numbers, never data.

    validate -> optimize

``validate`` checks every input before anything runs (``check_inputs``: the seed prompt in the
registry, the transitions and their failures, the tasks files, the pipeline config, the budget, the
optimizer endpoint, the policy). Transitions without a failure to learn from skip the run: nothing is
written and the registry is left alone. ``optimize`` runs APO (``run_apo``): rounds of critique and
edit, every candidate scored by real rollouts of the agent on the validation tasks, the winner
published as ``candidate`` with its lineage and gated to ``production`` by the gate checkpoints go
through. The search lives in one task because the gate compares the search's own evaluations; a
retried ``optimize`` resumes after the last completed round, its evaluations from the cache.

Params (defaults from the environment when the file is parsed):
  prompt: the registry prompt to improve (``calc-system@production``)
  transitions: a build output root or its transitions/ (``$TRACELEARN_DATA``, default ``./data``)
  config_hash: pipeline config hash prefix when the transitions hold several
  registry: registry location (``$TRACELEARN_REGISTRY``; empty: the default)
  runs: where run directories go (``./runs``); each run writes ``<runs>/<dag run id>/``
  agent, tasks, pipeline (required: the agent command, its validation tasks and the pipeline.yaml whose
    reward scores them; the calc example's are under examples/calc/ in a clone), limit (0: all), samples,
    seed, threshold, agent_timeout
  policy_url: the server the agent calls (empty: ``$OPENAI_BASE_URL`` or http://127.0.0.1:8000/v1);
    policy: or a model served for the run (``smollm2``); inject: gateway | registry
  optimizer_url, optimizer_name (empty: its only model), optimizer_max_tokens
  rounds, beam, branch, failures (per critique), max_rollouts / max_optimizer_tokens (0: none)
  gate_tasks: held-out tasks for the gate (empty: the validation rollouts); margin

Every task stops after ``$TRACELEARN_APO_TASK_TIMEOUT_MINUTES`` minutes (its ``execution_timeout``, read when
the file is parsed; default 720, for a whole APO search): a task that hangs fails, and is
retried, instead of holding a worker slot.

Run once without a scheduler:
  AIRFLOW__CORE__DAGS_FOLDER=<repo>/pipelines/dags TRACELEARN_DATA=./data/transitions \\
    airflow dags test tracelearn_apo --conf '{"agent": "python examples/calc/agent.py",
      "tasks": "examples/calc/tasks_val.jsonl", "pipeline": "examples/calc/pipeline.yaml"}'
"""

import logging
import os
import re
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from tracelearn.settings.variables import APO_OPTIMIZER_URL, APO_TASK_TIMEOUT, DATA_ROOT, REGISTRY, RUNS

log = logging.getLogger(__name__)

TASK_TIMEOUT = timedelta(minutes=APO_TASK_TIMEOUT.value())

TRANSITIONS = Asset(name="tracelearn_transitions", uri="tracelearn://transitions")
PROMPTS = Asset(name="tracelearn_prompts", uri="tracelearn://registry/prompts")


def _run_directory(params: dict[str, Any], run_id: str) -> Path:
    # Airflow run ids hold ':' and '+' (manual__2026-11-21T00:00:00+00:00): keep them path-safe.
    return Path(params["runs"]) / re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id)


def _config(params: dict[str, Any], run_id: str) -> Any:
    """The APO run the params describe (``tracelearn.training.apo.ApoConfig``)."""
    from tracelearn.training.apo import ApoConfig, SearchSettings
    from tracelearn.training.eval_inputs import EvalSpec

    missing = [name for name in ("agent", "tasks", "pipeline") if not params[name]]
    if missing:
        raise ValueError(f"params {', '.join(missing)} are required (the agent command, its validation tasks and "
                         "the pipeline.yaml whose reward scores them)")
    spec = EvalSpec(
        agent=tuple(shlex.split(params["agent"])),
        tasks=Path(params["tasks"]), limit=params["limit"] or None, samples=params["samples"], seed=params["seed"],
        pipeline_config=Path(params["pipeline"]), success_threshold=float(params["threshold"]),
        agent_timeout_s=float(params["agent_timeout"]), service_name="tracelearn-apo")
    search = SearchSettings(rounds=params["rounds"], beam=params["beam"], branch=params["branch"],
                            failures_per_critique=params["failures"], seed=params["seed"],
                            max_rollouts=params["max_rollouts"] or None,
                            max_optimizer_tokens=params["max_optimizer_tokens"] or None)
    return ApoConfig(
        prompt=params["prompt"], transitions=Path(params["transitions"]), optimizer_url=params["optimizer_url"],
        out=_run_directory(params, run_id), spec=spec, search=search, policy_url=params["policy_url"] or None,
        policy_model=params["policy"] or None, injection=params["inject"],
        optimizer_name=params["optimizer_name"] or None, optimizer_max_tokens=params["optimizer_max_tokens"],
        config_hash=params["config_hash"] or None, registry=params["registry"] or None,
        gate_tasks=Path(params["gate_tasks"]) if params["gate_tasks"] else None, margin=float(params["margin"]))


@dag(
    dag_id="tracelearn_apo",
    schedule=[TRANSITIONS],
    start_date=None,
    catchup=False,
    max_active_runs=1,
    default_args={"execution_timeout": TASK_TIMEOUT},
    tags=["tracelearn"],
    params={
        "prompt": Param("calc-system@production", type="string"),
        "transitions": Param(DATA_ROOT.text(), type="string"),
        "config_hash": Param("", type="string"),
        "registry": Param(REGISTRY.text() if REGISTRY.is_set() else "", type="string"),
        "runs": Param(RUNS.text(), type="string"),
        "agent": Param("", type="string", description="the agent command (required)"),
        "tasks": Param("", type="string", description="validation tasks, JSONL (required)"),
        "limit": Param(0, type="integer", minimum=0),
        "samples": Param(1, type="integer", minimum=1),
        "seed": Param(0, type="integer"),
        "pipeline": Param("", type="string", description="pipeline.yaml whose reward scores them (required)"),
        "threshold": Param(1.0, type="number"),
        "agent_timeout": Param(3600.0, type="number", exclusiveMinimum=0),
        "policy_url": Param(os.environ.get("OPENAI_BASE_URL", ""), type="string"),
        "policy": Param("", type="string", description="a model served for the run instead of policy_url"),
        "inject": Param("gateway", enum=["gateway", "registry"]),
        "optimizer_url": Param(APO_OPTIMIZER_URL.text(), type="string"),
        "optimizer_name": Param("", type="string"),
        "optimizer_max_tokens": Param(512, type="integer", minimum=1),
        "rounds": Param(3, type="integer", minimum=1),
        "beam": Param(4, type="integer", minimum=1),
        "branch": Param(4, type="integer", minimum=1),
        "failures": Param(4, type="integer", minimum=1),
        "max_rollouts": Param(0, type="integer", minimum=0),
        "max_optimizer_tokens": Param(0, type="integer", minimum=0),
        "gate_tasks": Param("", type="string"),
        "margin": Param(0.0, type="number", minimum=0, maximum=0.99),
    },
    doc_md=__doc__,
)
def tracelearn_apo() -> None:
    @task
    def validate() -> dict[str, Any]:
        """Check every input before anything runs; skip the run when there is nothing to learn from."""
        from tracelearn.pipelines.config import PipelineConfigError
        from tracelearn.registry import RegistryError
        from tracelearn.schemas.dataset import DatasetError
        from tracelearn.training.apo import NoFailuresError, OptimizerError, TemplateError, check_inputs
        from tracelearn.training.eval_inputs import EvaluationError

        context = get_current_context()
        try:
            inputs = check_inputs(_config(context["params"], context["run_id"]))
        except NoFailuresError as exc:
            raise AirflowSkipException(f"nothing to optimize: {exc}") from exc
        except (RegistryError, TemplateError, DatasetError, EvaluationError, PipelineConfigError, OptimizerError,
                ValueError) as exc:
            raise AirflowFailException(str(exc)) from exc
        log.info("APO inputs: %s", inputs.describe())
        return inputs.describe()

    @task(inlets=[TRANSITIONS], outlets=[PROMPTS])
    def optimize(validated: dict[str, Any]) -> dict[str, Any]:
        """Run APO; returns the run directory, the winner, the published version and the gate's verdict."""
        from tracelearn.training.apo import run_apo

        context = get_current_context()
        config = _config(context["params"], context["run_id"])
        result = run_apo(config)
        summary = result.summary
        log.info("%s: %s; %s rollouts, %s optimizer tokens", validated["prompt"], summary["verdict"],
                 summary["rollouts_run"], summary["optimizer"]["tokens"]["total_tokens"])
        decision = result.decision
        return {"run": str(result.files.out), "winner": (summary["winner"] or {}).get("candidate"),
                "published": summary["published"], "promoted": bool(decision and decision.promote)}

    # Wiring: validate()'s XComArg is resolved to its value when optimize runs.
    validated: Any = validate()
    optimize(validated)


tracelearn_apo()
