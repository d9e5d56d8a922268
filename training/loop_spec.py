"""``loop.yaml``: what one on-policy learning loop runs, parsed and checked before anything starts.

Example (``examples/calc/loop.yaml``; relative paths are relative to the file, and so is every word of
``agent`` that names a file there)::

    name: calc-policy            # the registry artifact the loop trains and promotes
    model: smollm2               # the starting policy, published as production when there is none
    agent: python agent.py --few-shot 1 --concurrency {concurrency}
    collect: {tasks: products.jsonl, samples: 4, limit: null, seed: 11}
    evaluate: {tasks: products_heldout.jsonl, samples: 2, limit: null, seed: 5}
    pipeline: pipeline.yaml      # spans -> transitions (reward function, credit, advantages)
    train: train.yaml            # the trainer's settings (grpo / sft sections)
    trainer: grpo                # grpo | sft
    margin: 0.0                  # success-rate points (a fraction) a candidate must gain to be promoted
    concurrency: 16              # agent tasks in flight (the {concurrency} placeholder)
    capture: sidecar             # sidecar: OTLP to a collector sidecar per round; exporter: in-process
    max_error_share: 0.5         # a collection with more failed rollouts than this stops the loop

The agent command follows the evaluation contract (``tracelearn.training.evaluate``): it gets
``--tasks --samples --seed`` appended unless it holds the placeholders. Collection uses round
``r``'s seed ``collect.seed + r - 1`` (new draws every round); evaluation always uses ``evaluate.seed``,
so every version is measured on the same tasks and draws and the rounds compare pairwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CAPTURES", "TRAINERS", "LoopSpec", "LoopSpecError", "TaskSet", "load_loop_spec", "parse_loop_spec"]

TRAINERS: tuple[str, ...] = ("grpo", "sft")
CAPTURES: tuple[str, ...] = ("sidecar", "exporter")


class LoopSpecError(ValueError):
    """A loop config is invalid: names the file, the key and what is allowed."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}")


@dataclass(frozen=True)
class TaskSet:
    """A tasks file (JSONL), how many of its tasks (``limit``, None: all), samples per task, and the seed."""

    tasks: Path
    samples: int
    seed: int
    limit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": str(self.tasks), "samples": self.samples, "seed": self.seed, "limit": self.limit}


@dataclass(frozen=True)
class LoopSpec:
    """Every setting of one loop (see the module docstring); paths are absolute."""

    name: str
    model: str
    agent: tuple[str, ...]
    collect: TaskSet
    evaluate: TaskSet
    pipeline: Path
    train: Path | None
    trainer: str = "grpo"
    margin: float = 0.0
    concurrency: int = 16
    capture: str = "sidecar"
    max_error_share: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model, "agent": list(self.agent), "collect": self.collect.to_dict(),
            "evaluate": self.evaluate.to_dict(), "pipeline": str(self.pipeline),
            "train": str(self.train) if self.train else None, "trainer": self.trainer, "margin": self.margin,
            "concurrency": self.concurrency, "capture": self.capture, "max_error_share": self.max_error_share,
        }

    def digest(self) -> str:
        """SHA-256 of the settings that decide what a round computes (not how many rounds run)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> LoopSpec:
        return dataclasses.replace(self, **changes)


_KEYS = ("name", "model", "agent", "collect", "evaluate", "pipeline", "train", "trainer", "margin", "concurrency",
         "capture", "max_error_share")
_TASK_KEYS = ("tasks", "samples", "seed", "limit")


def _path(value: Any, base: Path, source: str, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise LoopSpecError(source, key, f"{value!r} must be a path")
    path = (base / value).resolve()
    if not path.is_file():
        raise LoopSpecError(source, key, f"{path} is not a file")
    return path


def _whole(value: Any, source: str, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise LoopSpecError(source, key, f"{value!r} must be a whole number of at least {least}")
    return value


def _task_set(raw: Any, base: Path, source: str, key: str) -> TaskSet:
    if not isinstance(raw, Mapping):
        raise LoopSpecError(source, key, f"must be a mapping with {', '.join(_TASK_KEYS)}")
    unknown = [k for k in raw if k not in _TASK_KEYS]
    if unknown:
        raise LoopSpecError(source, f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(_TASK_KEYS)}")
    if "tasks" not in raw:
        raise LoopSpecError(source, f"{key}.tasks", "is required (a JSONL tasks file)")
    limit = raw.get("limit")
    return TaskSet(
        tasks=_path(raw["tasks"], base, source, f"{key}.tasks"),
        samples=_whole(raw.get("samples", 4), source, f"{key}.samples", 1),
        seed=_whole(raw.get("seed", 0), source, f"{key}.seed", 0),
        limit=None if limit is None else _whole(limit, source, f"{key}.limit", 1),
    )


def _agent(raw: Any, base: Path, source: str) -> tuple[str, ...]:
    words = shlex.split(raw) if isinstance(raw, str) else raw
    if not isinstance(words, list | tuple) or not words or not all(isinstance(w, str) and w for w in words):
        raise LoopSpecError(source, "agent", f"{raw!r} must be a command (a string or a list of words)")
    return tuple(str((base / w).resolve()) if not Path(w).is_absolute() and (base / w).is_file() else w for w in words)


def parse_loop_spec(raw: Mapping[str, Any], base: Path, source: str = "<loop spec>") -> LoopSpec:
    """A checked :class:`LoopSpec` from a decoded YAML mapping; relative paths resolve against ``base``."""
    unknown = [str(k) for k in raw if k not in _KEYS]
    if unknown:
        raise LoopSpecError(source, unknown[0], f"unknown key; allowed: {', '.join(_KEYS)}")
    for required in ("agent", "collect", "evaluate", "pipeline"):
        if required not in raw:
            raise LoopSpecError(source, required, "is required")
    trainer = raw.get("trainer", "grpo")
    if trainer not in TRAINERS:
        raise LoopSpecError(source, "trainer", f"{trainer!r} is unknown; use one of {', '.join(TRAINERS)}")
    capture = raw.get("capture", "sidecar")
    if capture not in CAPTURES:
        raise LoopSpecError(source, "capture", f"{capture!r} is unknown; use one of {', '.join(CAPTURES)}")
    margin, share = raw.get("margin", 0.0), raw.get("max_error_share", 0.5)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
        raise LoopSpecError(source, "margin", f"{margin!r} must be a fraction in [0, 1) (0.05 = 5 points)")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise LoopSpecError(source, "max_error_share", f"{share!r} must be a fraction in [0, 1]")
    for key in ("name", "model"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise LoopSpecError(source, key, f"{raw[key]!r} must be a non-empty string")
    return LoopSpec(
        name=raw.get("name", "calc-policy"),
        model=raw.get("model", "smollm2"),
        agent=_agent(raw["agent"], base, source),
        collect=_task_set(raw["collect"], base, source, "collect"),
        evaluate=_task_set(raw["evaluate"], base, source, "evaluate"),
        pipeline=_path(raw["pipeline"], base, source, "pipeline"),
        train=_path(raw["train"], base, source, "train") if raw.get("train") else None,
        trainer=trainer,
        margin=float(margin),
        concurrency=_whole(raw.get("concurrency", 16), source, "concurrency", 1),
        capture=capture,
        max_error_share=float(share),
    )


def load_loop_spec(path: str | Path) -> LoopSpec:
    """Read and check ``loop.yaml``; raises :class:`LoopSpecError` naming the file and the key."""
    location = Path(path)
    try:
        raw = yaml.safe_load(location.read_text(encoding="utf-8"))
    except OSError as error:
        raise LoopSpecError(str(location), "<file>", f"cannot be read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise LoopSpecError(str(location), "<file>", f"is not valid YAML: {error}") from None
    if not isinstance(raw, Mapping):
        raise LoopSpecError(str(location), "<top>", "must be a mapping of settings")
    return parse_loop_spec(raw, location.resolve().parent, str(location))
