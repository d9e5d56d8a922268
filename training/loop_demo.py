"""The demo's loop: the calc example's ``loop.yaml`` at a demo size (``tracelearn demo``).

The example lives in the repository (``examples/calc/``, not installed with the package), so the
caller names its directory; :func:`demo_spec` rewrites its loop config with absolute paths and the
demo's numbers of tasks, samples and epochs into the demo's folder, which is then an ordinary loop
workdir (``tracelearn loop --workdir <it> --config <it>/loop.yaml`` reports on it or continues it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tracelearn.training.loop_spec import LoopSpec, load_loop_spec

__all__ = ["EXAMPLE_FILES", "FULL", "QUICK", "DemoSize", "ExampleNotFoundError", "demo_spec"]

# What the demo reads from the example's directory.
EXAMPLE_FILES: tuple[str, ...] = ("loop.yaml", "train.yaml", "pipeline.yaml", "agent.py")


class ExampleNotFoundError(FileNotFoundError):
    """The directory given as the calc example lacks one of its files (:data:`EXAMPLE_FILES`)."""


@dataclass(frozen=True)
class DemoSize:
    """How much each round runs: training tasks and samples, held-out tasks and samples, epochs, rounds."""

    train_tasks: int
    train_samples: int
    eval_tasks: int | None
    eval_samples: int
    epochs: int | None  # None: the train config's
    rounds: int


FULL = DemoSize(train_tasks=24, train_samples=4, eval_tasks=32, eval_samples=2, epochs=None, rounds=2)
QUICK = DemoSize(train_tasks=6, train_samples=4, eval_tasks=8, eval_samples=1, epochs=1, rounds=2)


def demo_spec(size: DemoSize, model: str, workdir: Path, example: Path) -> tuple[LoopSpec, Path]:
    """``example/loop.yaml`` at the demo's size (its train config written to ``workdir``), and the written
    loop config. Raises :class:`ExampleNotFoundError` naming the files of :data:`EXAMPLE_FILES` that
    ``example`` lacks, ``LoopSpecError`` for what is wrong in the written config."""
    lacking = [name for name in EXAMPLE_FILES if not (example / name).is_file()]
    if lacking:
        raise ExampleNotFoundError(f"{example} is not the calc example's directory: it has no {', '.join(lacking)}")
    train = yaml.safe_load((example / "train.yaml").read_text(encoding="utf-8"))
    if size.epochs is not None:
        train["grpo"]["epochs"] = size.epochs
    (workdir / "train.yaml").write_text(yaml.safe_dump(train, sort_keys=False), encoding="utf-8")
    raw = yaml.safe_load((example / "loop.yaml").read_text(encoding="utf-8"))
    raw.update(model=model, pipeline=str(example / raw["pipeline"]), train=str(workdir / "train.yaml"),
               capture="sidecar", agent=raw["agent"].replace("python agent.py", f"python {example / 'agent.py'}"),
               collect={**raw["collect"], "tasks": str(example / raw["collect"]["tasks"]), "limit": size.train_tasks,
                        "samples": size.train_samples},
               evaluate={**raw["evaluate"], "tasks": str(example / raw["evaluate"]["tasks"]),
                         "limit": size.eval_tasks, "samples": size.eval_samples})
    path = workdir / "loop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_loop_spec(path), path
