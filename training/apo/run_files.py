"""An APO run's directory: what it was asked, each completed round, the tree, and what came out.

    runs/apo-7/
      apo.json             the configuration that decides the search (compared on resume)
      rounds/round-N.json  one file per completed round (0 is the seed's evaluation), written atomically
      tree.json            every candidate: prompt, parent, critique, failures seen, tokens, score or rejection
      summary.json         the seed and best prompt with scores and intervals, costs, why the search stopped
      best_prompt.txt      the winner's text (the seed's when no candidate beat it)
      eval/                eval.json and eval_rollouts.parquet: the best prompt against the seed
      gate.json            the promotion decision, when a winner was published
      gate-eval/           eval.json of the gate's held-out evaluations (with --gate-tasks)
      evaluations/<id>/    each agent run (tasks, agent.log, captured spans)
      registry/            APO's own registry: every evaluated prompt as a version
      cache/               scored rollouts by (prompt hash, task, sample, seed)
      optimizer-spans/     the optimizer's calls as a spans dataset

Resumption: a run started again with the same ``--out`` and the same configuration continues after
its last completed round; a different configuration is refused (naming what differs) unless
``restart``, which removes the rounds, tree, summary and agent runs and keeps the cache (its results
stay valid: they are keyed by everything that decides them). What may change on a resume is what
does not change the search already done: the number of rounds, the budgets, the margin, timeouts.

May import: the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ResumeConflictError", "RunFiles", "write_json_atomically"]

CONFIG_FILE = "apo.json"
# What a restart removes; the cache, the registry and the optimizer spans stay.
RESTART_REMOVES = ("rounds", "tree.json", "summary.json", "best_prompt.txt", "eval", "gate.json", "gate-eval",
                   "evaluations")


class ResumeConflictError(ValueError):
    """``--out`` holds another APO run (or other files); the message says what differs and what to do."""


def write_json_atomically(path: Path, document: Any) -> Path:
    """Write ``document`` as JSON so that ``path`` is the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump(document, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    temporary.replace(path)
    return path


def _differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(previous) | set(current))
    return [f"{key}: {json.dumps(previous.get(key))} -> {json.dumps(current.get(key))}"
            for key in keys if previous.get(key) != current.get(key)]


class RunFiles:
    """The files of one APO run under ``out`` (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rounds = out / "rounds"
        self.tree = out / "tree.json"
        self.summary = out / "summary.json"
        self.best_prompt = out / "best_prompt.txt"
        self.gate = out / "gate.json"
        self.evaluations = out / "evaluations"
        self.registry = out / "registry"
        self.cache = out / "cache"
        self.optimizer_spans = out / "optimizer-spans"
        self.eval = out / "eval"
        self.gate_eval = out / "gate-eval"

    def start(self, search_config: Mapping[str, Any], restart: bool) -> int:
        """Record ``search_config`` (JSON-ready) and return the number of rounds already completed (0 for
        a new run: the seed's evaluation is round 0).

        Raises :class:`ResumeConflictError` when ``out`` holds a run with another configuration (unless
        ``restart``), or files that are no APO run.
        """
        config_path = self.out / CONFIG_FILE
        current = json.loads(json.dumps(search_config))  # as it reads back: tuples become lists
        if config_path.exists():
            previous = json.loads(config_path.read_text(encoding="utf-8"))
            if previous != current and not restart:
                differences = "; ".join(_differences(previous, current))
                raise ResumeConflictError(
                    f"{self.out} holds an APO run with another configuration ({differences}); resume it with its "
                    "own flags, start over with --restart (keeps the cache), or choose "
                    "another --out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise ResumeConflictError(f"{self.out} holds files but no APO run ({CONFIG_FILE}); choose an empty or new "
                                      "--out")
        if restart:
            for name in RESTART_REMOVES:
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        write_json_atomically(config_path, current)
        return len(self.completed_rounds())

    def round_path(self, number: int) -> Path:
        return self.rounds / f"round-{number}.json"

    def completed_rounds(self) -> list[dict[str, Any]]:
        """The round documents written so far, in order (a gap ends the list: later ones are not trusted)."""
        documents: list[dict[str, Any]] = []
        while self.round_path(len(documents)).exists():
            documents.append(json.loads(self.round_path(len(documents)).read_text(encoding="utf-8")))
        return documents

    def write_round(self, number: int, document: Mapping[str, Any]) -> Path:
        return write_json_atomically(self.round_path(number), dict(document))
