"""What an evaluation is given, checked before anything starts: the spec, the tasks file, the agent command.

:class:`EvalSpec` says what to run and how to score it; :func:`read_task_ids` reads the tasks file
(JSONL, one object with a unique ``id`` per line); :func:`agent_command` fills the agent's
placeholders (the agent contract is in ``tracelearn.training.evaluate``); :func:`eval_pipeline_config`
reads the pipeline config as evaluation runs it. The errors every evaluation step raises live here too,
under :class:`EvaluationError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracelearn.pipelines.config import PipelineConfig, WatermarkConfig, load_config

__all__ = [
    "AgentError",
    "CaptureError",
    "EvalSpec",
    "EvaluationError",
    "ModelServerError",
    "TasksFileError",
    "UnknownModelError",
    "agent_command",
    "eval_pipeline_config",
    "read_task_ids",
]

# Appended unless the command holds the placeholder; {concurrency} is only ever substituted.
APPENDED_ARGUMENTS: tuple[tuple[str, str], ...] = (("tasks", "--tasks"), ("samples", "--samples"), ("seed", "--seed"))
PYTHON_NAMES = frozenset({"python", "python3"})


class EvaluationError(Exception):
    """An evaluation could not run; the message names the file, the command or the server, and what to do."""


class TasksFileError(EvaluationError, ValueError):
    """The tasks file is missing, empty, or has a line that is not a task with a unique ``id``."""


class UnknownModelError(EvaluationError, LookupError):
    """The model names nothing that can be served (no such path, registry artifact, or served model)."""


class ModelServerError(EvaluationError):
    """The model server exited, did not become ready, or answered ``/v1/models`` with something else."""


class AgentError(EvaluationError):
    """The agent command was not found, exited with an error, or ran past its timeout."""


class CaptureError(EvaluationError):
    """The agent ran but no spans landed in the evaluation's dataset."""



@dataclass(frozen=True)
class EvalSpec:
    """What to run and how to score it; the same spec gives two versions the same tasks and seeds.

    ``agent`` is the command (see ``tracelearn.training.evaluate`` for its placeholders); ``tasks`` a
    JSONL file of tasks (``limit``: only the first N); ``pipeline_config`` the ``pipeline.yaml`` whose
    rewards score the rollouts. Every task runs ``samples`` times; ``seed`` is passed to the agent (the
    calc agent seeds every request from it, the task, the sample and the turn). A rollout succeeds when
    the pipeline's primary reward is at least ``success_threshold``. There are no default paths: the
    caller names its agent, tasks and config (the bundled calc example's are under ``examples/calc/``
    in a clone).
    """

    agent: Sequence[str]
    tasks: Path
    pipeline_config: Path
    samples: int = 4
    seed: int = 0
    limit: int | None = None
    success_threshold: float = 1.0
    concurrency: int = 4
    agent_timeout_s: float = 3600.0
    server_start_timeout_s: float = 300.0
    service_name: str = "tracelearn-eval"

    def __post_init__(self) -> None:
        if not self.agent:
            raise ValueError("EvalSpec.agent: the agent command is empty")
        for name in ("samples", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalSpec.{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalSpec.limit must be at least 1 (or None for every task), got {self.limit}")
        for name in ("agent_timeout_s", "server_start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EvalSpec.{name} must be a positive number of seconds, got {getattr(self, name)}")
        if not math.isfinite(self.success_threshold):
            raise ValueError(f"EvalSpec.success_threshold must be a finite number, got {self.success_threshold}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": list(self.agent),
            "tasks": str(self.tasks),
            "samples": self.samples,
            "seed": self.seed,
            "limit": self.limit,
            "pipeline_config": str(self.pipeline_config),
            "success_threshold": self.success_threshold,
            "concurrency": self.concurrency,
        }



def read_task_ids(path: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """The task ids and raw lines of the first ``limit`` tasks of a JSONL tasks file.

    Raises :class:`TasksFileError` naming the file and line for a missing file, a line that is not
    a JSON object with an ``id``, a repeated id, or a file without tasks.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TasksFileError(f"{path}: cannot read the tasks file ({error.strerror or error})") from None
    ids: list[str] = []
    lines: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TasksFileError(f"{path}:{number}: not JSON ({error.msg}); write one task object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str | int) or isinstance(row.get("id"), bool):
            raise TasksFileError(f'{path}:{number}: a task must be a JSON object with an "id" (string or integer)')
        task_id = str(row["id"])
        if task_id in seen:
            raise TasksFileError(
                f"{path}:{number}: task id {task_id!r} repeats line {seen[task_id]}; ids must be unique"
            )
        seen[task_id] = number
        ids.append(task_id)
        lines.append(line)
        if limit is not None and len(ids) == limit:
            break
    if not ids:
        raise TasksFileError(f"{path}: the tasks file holds no tasks")
    return ids, lines


def agent_command(spec: EvalSpec, tasks_file: Path) -> list[str]:
    """The agent's argument list with placeholders filled and the missing arguments appended.

    Raises :class:`AgentError` when its executable is neither a file nor on ``PATH``.
    """
    values = {"tasks": str(tasks_file), "samples": str(spec.samples), "seed": str(spec.seed),
              "concurrency": str(spec.concurrency)}
    command = list(spec.agent)
    if command[0] in PYTHON_NAMES:
        command[0] = sys.executable
    if not (Path(command[0]).is_file() or shutil.which(command[0])):
        raise AgentError(f"agent command not found: {command[0]!r} is neither a file nor on PATH")
    text = " ".join(command)
    filled = []
    for argument in command:
        for name, value in values.items():
            argument = argument.replace(f"{{{name}}}", value)
        filled.append(argument)
    for name, flag in APPENDED_ARGUMENTS:
        if f"{{{name}}}" not in text:
            filled += [flag, values[name]]
    return filled



def eval_pipeline_config(path: Path) -> PipelineConfig:
    """The pipeline config as evaluation runs it: no watermark wait (the agent has exited and flushed)
    and rollouts without a reward kept (they are failures, not absences).

    Its reward function is found as the config says (a file relative to the config, or a module on
    the import path; see ``tracelearn.pipelines.config``). Raises ``PipelineConfigError`` naming the
    file and key.
    """
    config = load_config(path)
    return dataclasses.replace(
        config,
        reward=dataclasses.replace(config.reward, missing="keep"),
        watermark=WatermarkConfig(lateness_seconds=0.0),
    )
