"""One round of the on-policy learning loop (Airflow 3 TaskFlow); each finished round schedules the next.

Thin wiring only: every task is one step of ``tracelearn.training.loop`` (``run_step``), the same
functions ``tracelearn loop`` calls, on the same workdir, so a round can be begun by one and finished by
the other. XCom carries the round number only; every step's output is in ``<workdir>/rounds/NN/``.

    plan -> collect -> build -> train -> publish -> evaluate -> gate  (outlet: tracelearn_loop_round)

``plan`` picks the first round that is not settled and skips the run when ``rounds`` rounds are done;
a round without learning signal settles at ``train`` and its later tasks do nothing. The DAG is
scheduled by its own asset: in a deployment with a scheduler, the end of one round starts the next,
until ``rounds``. ``tracelearn loop --airflow`` runs it with ``dag.test()`` once per round instead.

Params (defaults from the environment when the file is parsed, which asset-triggered runs use):
  config:   loop.yaml (``$TRACELEARN_LOOP_CONFIG``)
  workdir:  the loop's folder (``$TRACELEARN_LOOP_WORKDIR``, default ``./runs/loop``)
  rounds:   how many rounds in all (``$TRACELEARN_LOOP_ROUNDS``, default 3)
  base_url: a live server following the production alias (empty: each collection serves production itself)

Every task stops after ``$TRACELEARN_LOOP_TASK_TIMEOUT_MINUTES`` minutes (its ``execution_timeout``, read
when the file is parsed; default 1440, for a collection, a training run or two evaluations); a step
that fails or times out is redone by the next run of the round, which resumes at it.
"""

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from tracelearn.settings.variables import LOOP_CONFIG, LOOP_ROUNDS, LOOP_TASK_TIMEOUT, LOOP_WORKDIR

log = logging.getLogger(__name__)

TASK_TIMEOUT = timedelta(minutes=LOOP_TASK_TIMEOUT.value())

LOOP_ROUND = Asset(name="tracelearn_loop_round", uri="tracelearn://loop/rounds")
STEPS = ("collect", "build", "train", "publish", "evaluate", "gate")


def _context(params: dict[str, Any]) -> Any:
    from rich.console import Console

    from tracelearn.training.loop import LoopContext, prepare_loop
    from tracelearn.training.loop_spec import load_loop_spec

    console = Console(width=160)
    spec = load_loop_spec(params["config"])
    workdir = Path(params["workdir"]).resolve()
    registry = prepare_loop(spec, workdir, console)
    return LoopContext(spec, workdir, registry, console, params["base_url"] or None, progress=False)


@dag(
    dag_id="tracelearn_loop",
    schedule=[LOOP_ROUND],
    start_date=None,
    catchup=False,
    max_active_runs=1,
    default_args={"execution_timeout": TASK_TIMEOUT},
    tags=["tracelearn"],
    params={
        "config": Param(LOOP_CONFIG.text() or "", type="string"),
        "workdir": Param(LOOP_WORKDIR.text(), type="string"),
        "rounds": Param(LOOP_ROUNDS.value(), type="integer", minimum=1),
        "base_url": Param("", type="string"),
    },
    doc_md=__doc__,
)
def tracelearn_loop() -> None:
    @task
    def plan() -> int:
        """The round this run works on: the first one not settled; skip when all rounds are."""
        from tracelearn.training.loop import LoopError, RoundState
        from tracelearn.training.loop_spec import LoopSpecError

        params = get_current_context()["params"]
        try:
            context = _context(params)
        except (LoopSpecError, LoopError) as error:
            raise AirflowFailException(str(error)) from error
        for number in range(1, params["rounds"] + 1):
            if not RoundState.load(context.workdir, number).settled:
                log.info("round %d of %d", number, params["rounds"])
                return number
        raise AirflowSkipException(f"all {params['rounds']} rounds are done in {context.workdir}")

    def step_task(step: str) -> Any:
        @task(task_id=step, outlets=[LOOP_ROUND] if step == STEPS[-1] else [])
        def run(number: int) -> int:
            from tracelearn.training.loop import LoopError, run_step

            try:
                state = run_step(_context(get_current_context()["params"]), number, step)
            except LoopError as error:
                raise AirflowFailException(str(error)) from error
            if state.settled:
                log.info("round %d: %s: %s", number, state.outcome, state.reason)
            return number

        return run

    number = plan()
    for step in STEPS:
        number = step_task(step)(number)


tracelearn_loop()
