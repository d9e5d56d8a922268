"""What learns on the tool task, from one collection: GRPO vs SFT, credit assignment, per-call vs merged.

One collection of the base policy (the calc agent on the product tasks, through the real capture:
``opentelemetry-instrument``, the collector sidecar, spans on disk) is the budget every variant gets.
Each variant builds its own transitions from those spans (its pipeline settings), trains from the base
policy (its trainer), is published to the registry and evaluated on the held-out tasks with the same
seed as the base (paired). The steps are those of ``tracelearn loop`` (``tracelearn.training.loop``),
so every number comes through the same parts as a loop round; the folder keeps everything, and a
rerun reuses what is done.

Variants (``--variants``, default all):

- ``grpo``: GRPO, credit ``identical``, advantages per rollout (the loop's default, Agent Lightning v1);
- ``sft``: supervised fine-tuning on the rewarded rollouts' calls (reward 1), the same spans;
- ``grpo-identical-call``, ``grpo-discounted-call`` (gamma 0.5), ``grpo-last-step-call``: credit per call
  with advantages per call (``level: transition``, where the credit decides the advantage; at rollout
  level every call of a rollout shares the rollout's advantage whatever the credit);
- ``grpo-trajectory``: each rollout's calls merged into one sequence (``trajectory: true``), the tool
  result masked out of the loss.

    .venv/bin/python benchmarks/learning_comparison.py --workdir runs/compare [--limit 32 --samples 4]

Prints one table: sequences trained, training seconds, held-out success [95% CI], the paired difference
to the base [95% CI], tool-call rate [95% CI] and mean LLM calls per rollout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import parse_config
from tracelearn.registry import Lineage
from tracelearn.training.config import load_train_config
from tracelearn.training.evaluate import compare
from tracelearn.training.loop import LoopContext, prepare_loop, run_step
from tracelearn.training.loop_evals import behaviour
from tracelearn.training.loop_spec import TaskSet, load_loop_spec

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "calc" / "loop.yaml"
CALL_LEVEL = {"advantage": {"level": "transition"}}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "grpo": ("grpo", {}),
    "sft": ("sft", {}),
    "grpo-identical-call": ("grpo", {**CALL_LEVEL, "credit": {"method": "identical"}}),
    "grpo-discounted-call": ("grpo", {**CALL_LEVEL, "credit": {"method": "discounted", "gamma": 0.5}}),
    "grpo-last-step-call": ("grpo", {**CALL_LEVEL, "credit": {"method": "last_step"}}),
    "grpo-trajectory": ("grpo", {"trajectory": True}),
}


def pipeline_for(base: Path, changes: dict[str, Any]) -> Any:
    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw, f"{base} + {json.dumps(changes)}")


def run_variant(name: str, context: LoopContext, spans: Path, console: Console) -> dict[str, Any]:
    """Build, train, publish and evaluate one variant (or read it back when done)."""
    from tracelearn.training.grpo import train_grpo
    from tracelearn.training.sft import train_sft

    folder = context.workdir / "variants" / name
    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    trainer, changes = VARIANTS[name]
    config = pipeline_for(context.spec.pipeline, changes)
    console.rule(f"{name}: build ({json.dumps(changes) or 'the loop pipeline'}), train {trainer}")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=config.watermark.lateness_seconds + 1)
    built = build_transitions(spans, folder / "data", config, now=later)
    started = time.monotonic()
    train = train_grpo if trainer == "grpo" else train_sft
    result = train(folder / "data", "registry:calc-policy@1", folder / "run", load_train_config(context.spec.train),
                   config_hash=built.config_hash, overwrite=True, registry=context.registry)
    seconds = time.monotonic() - started
    lineage = Lineage.from_dict(json.loads(result.run.lineage_path.read_text(encoding="utf-8")))
    version = context.registry.publish("checkpoint", context.spec.name, result.checkpoint, lineage=lineage,
                                       metadata={"variant": name}).version
    evaluation = context.evaluations.result(version.ref)
    base = context.evaluations.result("calc-policy@1")
    record = {"variant": name, "trainer": trainer, "changes": changes, "version": version.ref,
              "transitions": built.summary["transitions"], "sequences": result.summary["sequences"]["kept"],
              "steps": result.summary["steps"], "train_seconds": seconds,
              "behaviour": behaviour(evaluation).to_dict(), "vs_base": compare(evaluation, base).to_dict()}
    done.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _rate(behaviour: dict[str, Any], key: str) -> str:
    low, high = behaviour[f"{key}_interval_95"]
    return f"{100 * behaviour[f'{key}_rate']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the loop config (agent, tasks, pipeline, train)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "learning-comparison")
    parser.add_argument("--limit", type=int, default=32, help="training tasks collected")
    parser.add_argument("--samples", type=int, default=4, help="samples per training task")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tracelearn loop: spinning OpenMP threads on a shared CPU
    console = Console(width=160)
    spec = load_loop_spec(args.config)
    spec = spec.replace(collect=TaskSet(spec.collect.tasks, args.samples, spec.collect.seed, args.limit),
                        capture="sidecar")
    workdir = args.workdir.resolve()
    registry = prepare_loop(spec, workdir, console)
    context = LoopContext(spec, workdir, registry, console)
    collected = run_step(context, 1, "collect").data
    base = behaviour(context.evaluations.result("calc-policy@1")).to_dict()
    records = [run_variant(name, context, collected, console) for name in args.variants.split(",")]
    table = Table(title=f"one collection of the base policy ({args.limit} tasks x {args.samples} samples), each "
                        f"variant trained from it once; held-out {spec.evaluate.tasks.name} x {spec.evaluate.samples} "
                        f"samples, seed {spec.evaluate.seed} (95% intervals)", title_justify="left")
    for column in ("variant", "sequences", "train s", "held-out success", "vs base (paired)", "tool calls", "turns"):
        table.add_column(column)
    table.add_row("base policy", "-", "-", _rate(base, "success"), "-", _rate(base, "tool_call"),
                  f"{base['mean_llm_calls']:.2f}")
    for record in records:
        versus = record["vs_base"]
        low, high = versus["interval_95"]
        table.add_row(record["variant"], str(record["sequences"]), f"{record['train_seconds']:.0f}",
                      _rate(record["behaviour"], "success"),
                      f"{100 * versus['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]",
                      _rate(record["behaviour"], "tool_call"), f"{record['behaviour']['mean_llm_calls']:.2f}")
    console.print(table)
    (workdir / "comparison.json").write_text(json.dumps({"base": base, "variants": records}, indent=2) + "\n",
                                             encoding="utf-8")


if __name__ == "__main__":
    main()
