"""A training run's directory: what was asked, what happened step by step, and what came out.

    runs/43/
      config.json      the trainer, the model and data it was given, the resolved train config and its hash
      metrics.jsonl    one JSON object per optimizer step, appended and flushed as training goes
      training.png     loss, KL, clipping and reward per step
      checkpoint/      the trained weights (a LoRA adapter or a full model) and the tokenizer
      lineage.json     the registry lineage of the checkpoint (tracelearn registry publish --lineage)
      summary.json     counts, timings and final metrics, written last: its presence means the run finished

A directory that already holds a finished run (``summary.json``) or a checkpoint is refused, so
a rerun never overwrites results silently; pass ``overwrite`` to replace them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tracelearn.registry import Lineage

__all__ = ["RunDirectory", "RunDirectoryError", "code_revision", "files_snapshot", "plot_training"]


class RunDirectoryError(FileExistsError):
    """The run directory already holds results (and ``overwrite`` was not given)."""


def _json_ready(value: Any) -> Any:
    """Non-finite floats as null: JSON has no NaN, and a reader must not choke on a diverged step."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _write_json_atomically(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump(_json_ready(data), stream, indent=2, sort_keys=True)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    temporary.replace(path)


def code_revision(start: Path | None = None) -> str | None:
    """The git commit of the code (``+dirty`` when the tree has changes), or None outside a checkout."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def files_snapshot(files: Iterable[Path]) -> str:
    """SHA-256 over the names, sizes and bytes of exactly the files read: the dataset snapshot in the lineage."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RunDirectory:
    """One run's directory (see the module docstring); metrics are appended while it is open."""

    path: Path
    _metrics: IO[str] | None = None

    @classmethod
    def create(cls, path: Path, overwrite: bool = False) -> RunDirectory:
        run = cls(Path(path))
        finished = [p for p in (run.summary_path, run.checkpoint_path) if p.exists()]
        if finished and not overwrite:
            raise RunDirectoryError(
                f"{run.path} already holds a run ({', '.join(p.name for p in finished)}); "
                "choose another --out or pass --overwrite to replace it"
            )
        if overwrite:
            for stale in (run.checkpoint_path, run.metrics_path, run.summary_path, run.lineage_path, run.plot_path):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def lineage_path(self) -> Path:
        return self.path / "lineage.json"

    @property
    def plot_path(self) -> Path:
        return self.path / "training.png"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint"

    @property
    def run_id(self) -> str:
        """A stable id for this run: the directory name plus a random suffix fixed in config.json."""
        if self.config_path.exists():
            recorded = json.loads(self.config_path.read_text(encoding="utf-8")).get("run_id")
            if isinstance(recorded, str):
                return recorded
        return f"{self.path.resolve().name}-{uuid.uuid4().hex[:8]}"

    def write_config(self, config: Mapping[str, Any]) -> None:
        _write_json_atomically(self.config_path, config)

    def log_step(self, metrics: Mapping[str, Any]) -> None:
        """Append one step's metrics and flush, so a crashed run keeps every step it finished."""
        if self._metrics is None:
            self._metrics = self.metrics_path.open("a", encoding="utf-8")
        self._metrics.write(json.dumps(_json_ready(dict(metrics)), sort_keys=True) + "\n")
        self._metrics.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line]

    def write_lineage(self, lineage: Lineage) -> None:
        _write_json_atomically(self.lineage_path, lineage.to_dict())

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.close()
        _write_json_atomically(self.summary_path, summary)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


_PANELS = (
    ("loss", "loss"),
    ("kl", "KL to reference (k3) / to behaviour"),
    ("clip_fraction", "clipped token fraction"),
    ("reward_mean", "mean reward of the step's samples"),
)


def plot_training(metrics: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Four panels over steps (loss, KL, clip fraction, reward); None when there are no steps to plot."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    for axis, (key, label) in zip(axes.flat, _PANELS, strict=True):
        values = [m.get(key) for m in metrics]
        points = [(s, v) for s, v in zip(steps, values, strict=True) if isinstance(v, int | float)]
        if key == "kl":
            behaviour = [(s, m.get("kl_to_behaviour")) for s, m in zip(steps, metrics, strict=True)]
            behaviour_points = [(s, v) for s, v in behaviour if isinstance(v, int | float)]
            if behaviour_points:
                axis.plot(*zip(*behaviour_points, strict=True), label="to behaviour policy", color="tab:orange")
        if points:
            axis.plot(*zip(*points, strict=True), label=key, color="tab:blue")
        axis.set_title(label)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if key == "kl" and axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
