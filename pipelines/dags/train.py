"""Transitions -> train -> publish candidate -> evaluate -> gate (Airflow 3 TaskFlow), scheduled by new transitions.

Thin wiring only: every task calls ``tracelearn.training`` with paths and params; XCom carries paths,
versions and numbers, never data.

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
  eval_tasks, eval_samples, eval_seed, eval_limit (0: all), eval_concurrency (agent requests in flight),
  agent (empty: the calc agent), eval_pipeline
  margin: success-rate points (as a fraction) the candidate must gain to be promoted

Every task stops after ``$TRACELEARN_TRAIN_TASK_TIMEOUT_MINUTES`` minutes (its ``execution_timeout``, read when
the file is parsed; default 1440, for a training run or an evaluation): a task that hangs fails, and is
retried, instead of holding a worker slot.

Run once without a scheduler:
  AIRFLOW__CORE__DAGS_FOLDER=<repo>/pipelines/dags TRACELEARN_DATA=./data \\
    airflow dags test tracelearn_train
"""

import json
import logging
import os
import re
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
REPO = Path(__file__).resolve().parents[2]


def _run_directory(params: dict[str, Any], run_id: str) -> Path:
    # Airflow run ids hold ':' and '+' (manual__2026-11-21T00:00:00+00:00): keep them path-safe.
    return Path(params["runs"]) / re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id)


def _train_config(params: dict[str, Any]) -> Any:
    from tracelearn.training.config import load_train_config, parse_lora_flag, with_overrides

    config = load_train_config(params["train_config"] or None)
    return with_overrides(config, {"lora": parse_lora_flag(params["lora"])}) if params["lora"] else config


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
        "eval_tasks": Param(str(REPO / "examples" / "calc" / "tasks_heldout.jsonl"), type="string"),
        "eval_samples": Param(4, type="integer", minimum=1),
        "eval_seed": Param(0, type="integer"),
        "eval_limit": Param(0, type="integer", minimum=0),
        "eval_concurrency": Param(4, type="integer", minimum=1),
        "agent": Param("", type="string", description="agent command (empty: the bundled calc agent)"),
        "eval_pipeline": Param(str(REPO / "examples" / "calc" / "pipeline.yaml"), type="string"),
        "margin": Param(0.0, type="number", minimum=0, maximum=0.99),
    },
    doc_md=__doc__,
)
def tracelearn_train() -> None:
    @task
    def validate() -> dict[str, Any]:
        """Check the train config, the transitions and the registry before any model loads."""
        from tracelearn.registry import RegistryError, open_registry
        from tracelearn.schemas.dataset import DatasetError
        from tracelearn.training.config import TrainConfigError, train_config_hash
        from tracelearn.training.data import NoTrainingDataError, load_training_data

        context = get_current_context()
        params = context["params"]
        try:
            config = _train_config(params)
            data = load_training_data(params["transitions"], params["config_hash"] or None)
            open_registry(params["registry"] or None).names()
        except (TrainConfigError, DatasetError, NoTrainingDataError, RegistryError) as exc:
            raise AirflowFailException(str(exc)) from exc
        run = _run_directory(params, context["run_id"])
        return {"run": str(run), "config_hash": data.config_hash, "train_config_hash": train_config_hash(config),
                "model": params["model"] or f"registry:{params['name']}@production", "rows": data.frame.height}

    @task.branch
    def backend() -> str:
        return "prepare_verl" if get_current_context()["params"]["backend"] == "verl" else "train_torch"

    @task(inlets=[TRANSITIONS])
    def train_torch(validated: dict[str, Any]) -> dict[str, str]:
        """GRPO or SFT in this worker; returns the checkpoint and its lineage file."""
        from tracelearn.registry import open_registry
        from tracelearn.training.grpo import train_grpo
        from tracelearn.training.sft import train_sft

        params = get_current_context()["params"]
        trainer = train_grpo if params["trainer"] == "grpo" else train_sft
        result = trainer(params["transitions"], validated["model"], validated["run"], _train_config(params),
                         config_hash=validated["config_hash"], progress=False,
                         registry=open_registry(params["registry"] or None))
        log.info("trained %s steps: %s", result.summary["steps"], json.dumps(result.summary["final"]))
        return {"checkpoint": str(result.checkpoint), "lineage": str(result.run.lineage_path)}

    @task(inlets=[TRANSITIONS])
    def prepare_verl(validated: dict[str, Any]) -> str:
        """Write the verl job (data, overrides, launch.sh) under the run directory; returns its directory."""
        from tracelearn.registry import open_registry
        from tracelearn.training.verl_backend import prepare_verl_job, verl_model_path

        params = get_current_context()["params"]
        model_path = verl_model_path(validated["model"], open_registry(params["registry"] or None))
        job = prepare_verl_job(Path(params["transitions"]), Path(validated["run"]), model_path, _train_config(params),
                               config_hash=validated["config_hash"])
        return str(job.paths.directory)

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
        from tracelearn.registry import Lineage
        from tracelearn.training.data import load_training_data
        from tracelearn.training.run_dir import code_revision, files_snapshot
        from tracelearn.training.verl_backend import latest_verl_checkpoint

        params = get_current_context()["params"]
        checkpoint = latest_verl_checkpoint(Path(job_directory), lora=bool(params["lora"]))
        data = load_training_data(params["transitions"], validated["config_hash"])
        lineage = Lineage(
            dataset=str(data.root), partitions=data.partitions, dataset_snapshot=files_snapshot(data.files),
            pipeline_config_hash=data.config_hash, training_run_id=Path(validated["run"]).name,
            base_model=validated["model"], parent=validated["model"].removeprefix("registry:"),
            code_revision=code_revision(),
            extra={"trainer": "grpo", "backend": "verl", "train_config_hash": validated["train_config_hash"]},
        )
        path = Path(validated["run"]) / "lineage.json"
        path.write_text(json.dumps(lineage.to_dict(), indent=2), encoding="utf-8")
        return {"checkpoint": str(checkpoint), "lineage": str(path)}

    @task(trigger_rule="none_failed_min_one_success", outlets=[CHECKPOINTS])
    def publish_candidate(torch_run: dict[str, str] | None, verl_run: dict[str, str] | None) -> int:
        """Publish the trained checkpoint with its lineage and point ``candidate`` at it; returns the version."""
        from tracelearn.registry import Lineage, open_registry
        from tracelearn.training.gate import publish_candidate as publish

        params = get_current_context()["params"]
        trained = torch_run or verl_run
        assert trained is not None, "one training branch ran"
        lineage = Lineage.from_dict(json.loads(Path(trained["lineage"]).read_text(encoding="utf-8")))
        version = publish(open_registry(params["registry"] or None), params["name"], Path(trained["checkpoint"]),
                          lineage)
        log.info("published %s as candidate", version.ref)
        return version.version

    @task
    def evaluate(version: int, validated: dict[str, Any]) -> str:
        """Evaluate the candidate and production on the same tasks and seeds; write and return the decision."""
        from tracelearn.registry import ArtifactNotFoundError, open_registry
        from tracelearn.training.evaluate import EvalSpec, compare, evaluate_model, write_evaluations
        from tracelearn.training.gate import GateConfig, decide

        params = get_current_context()["params"]
        registry = open_registry(params["registry"] or None)
        spec_args: dict[str, Any] = {"tasks": Path(params["eval_tasks"]), "samples": params["eval_samples"],
                                     "seed": params["eval_seed"], "limit": params["eval_limit"] or None,
                                     "concurrency": params["eval_concurrency"],
                                     "pipeline_config": Path(params["eval_pipeline"])}
        if params["agent"]:
            spec_args["agent"] = tuple(params["agent"].split())
        spec = EvalSpec(**spec_args)
        workdir = Path(validated["run"]) / "gate"
        name = params["name"]
        candidate = evaluate_model(f"registry:{name}@{version}", spec, workdir / "candidate",
                                   registry=registry.location)
        try:
            current = registry.resolve(f"{name}@production")
        except ArtifactNotFoundError:
            current = None
        production = (evaluate_model(f"registry:{current.ref}", spec, workdir / "production",
                                     registry=registry.location) if current is not None else None)
        results = [candidate] if production is None else [candidate, production]
        write_evaluations(workdir, results, compare(candidate, production) if production is not None else None)
        decision = decide(candidate, production, GateConfig(margin=float(params["margin"])))
        return str(decision.write(workdir / "decision.json"))

    @task
    def gate(version: int, decision_path: str) -> dict[str, Any]:
        """Promote the candidate to production if the decision says so; gate.json records why either way."""
        from tracelearn.registry import open_registry
        from tracelearn.training.gate import GateDecision, apply_gate

        params = get_current_context()["params"]
        decision = GateDecision.from_dict(json.loads(Path(decision_path).read_text(encoding="utf-8")))
        applied = apply_gate(open_registry(params["registry"] or None), params["name"], version, decision)
        applied.write(Path(decision_path).with_name("gate.json"))
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
