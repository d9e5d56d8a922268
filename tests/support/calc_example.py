"""The bundled calc example, named explicitly: the library has no default paths into ``examples/``, so
tests give the agent, the tasks and the pipeline config the way a user does."""

import sys
from pathlib import Path
from typing import Any

from tracelearn.training.eval_inputs import EvalSpec

REPO = Path(__file__).resolve().parents[2]
CALC = REPO / "examples" / "calc"
CALC_AGENT: tuple[str, ...] = (sys.executable, str(CALC / "agent.py"), "--concurrency", "{concurrency}")
CALC_PIPELINE = CALC / "pipeline.yaml"
HELD_OUT = CALC / "tasks_heldout.jsonl"


def calc_spec(**fields: Any) -> EvalSpec:
    """An :class:`EvalSpec` running the calc agent on its held-out tasks, scored by its pipeline config;
    ``fields`` replace any of those and set the rest."""
    return EvalSpec(**{"agent": CALC_AGENT, "tasks": HELD_OUT, "pipeline_config": CALC_PIPELINE, **fields})
