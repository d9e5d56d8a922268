"""What learns on the tool task, from one collection: GRPO vs SFT, credit assignment, per-call vs merged.

One collection of the base policy (the calc agent on the product tasks, through the real capture:
``opentelemetry-instrument``, the collector sidecar, spans on disk) is the budget every variant gets.
Each variant builds its own transitions from those spans (its pipeline settings), trains from the base
policy (its trainer), is published to the registry and evaluated on the held-out tasks with the same
seed as the base (paired). The steps are those of ``tracelearn loop`` (``tracelearn.training.loop``),
so every number comes through the same parts as a loop round; the folder keeps everything, and a
rerun reuses what is done.

Variants (``--variants``, default the first six):

- ``grpo``: GRPO, credit ``identical``, advantages per rollout (the loop's default, Agent Lightning v1);
- ``sft``: supervised fine-tuning on the rewarded rollouts' calls (reward 1), the same spans;
- ``grpo-identical-call``, ``grpo-discounted-call`` (gamma 0.5), ``grpo-last-step-call``: credit per call
  with advantages per call (``level: transition``, where the credit decides the advantage; at rollout
  level every call of a rollout shares the rollout's advantage whatever the credit);
- ``grpo-trajectory``: each rollout's calls merged into one sequence (``trajectory: true``), the tool
  result masked out of the loss;
- ``grpo-seq-mean``, ``grpo-token-mean``, ``grpo-4x-steps``: the loss averaged per sequence, per token,
  or four times the optimizer steps (mini-batches of 8): why GRPO may learn less than SFT.

``--task one-call`` runs the agent's original one-digit tasks instead (no worked examples, temperature
0.7): there the base policy answers in one call, and GRPO once learned far less than SFT.

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
from tracelearn.training.config import parse_train_config
from tracelearn.training.eval_results import compare
from tracelearn.training.loop import LoopContext, prepare_loop, run_step
from tracelearn.training.loop_evals import behaviour
from tracelearn.training.loop_spec import LoopSpec, TaskSet, load_loop_spec, parse_loop_spec

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "calc" / "loop.yaml"
CALL_LEVEL = {"advantage": {"level": "transition"}}
# name -> (trainer, pipeline.yaml changes, train.yaml changes)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "grpo": ("grpo", {}, {}),
    "sft": ("sft", {}, {}),
    "grpo-identical-call": ("grpo", {**CALL_LEVEL, "credit": {"method": "identical"}}, {}),
    "grpo-discounted-call": ("grpo", {**CALL_LEVEL, "credit": {"method": "discounted", "gamma": 0.5}}, {}),
    "grpo-last-step-call": ("grpo", {**CALL_LEVEL, "credit": {"method": "last_step"}}, {}),
    "grpo-trajectory": ("grpo", {"trajectory": True}, {}),
    # Why GRPO may learn less than SFT (not run by default): the loss's length weighting, the step count.
    "grpo-seq-mean": ("grpo", {}, {"grpo": {"loss_aggregation": "seq_mean"}}),
    "grpo-token-mean": ("grpo", {}, {"grpo": {"loss_aggregation": "token_mean"}}),
    "grpo-4x-steps": ("grpo", {}, {"grpo": {"mini_batch_size": 8}}),
}
DEFAULT_VARIANTS = ("grpo", "sft", "grpo-identical-call", "grpo-discounted-call", "grpo-last-step-call",
                    "grpo-trajectory")
# --task one-call: the calc agent's original task (one-digit arithmetic, usually answered in one call)
ONE_CALL = {"agent": "python agent.py --concurrency {concurrency}", "collect": {"tasks": "tasks.jsonl"},
            "evaluate": {"tasks": "tasks_heldout.jsonl"}}


def merged(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each changed section's keys replaced (a section given as a mapping is merged)."""
    return {**raw, **{key: {**(raw.get(key) or {}), **value} if isinstance(value, dict) else value
                      for key, value in changes.items()}}


def pipeline_for(base: Path, changes: dict[str, Any]) -> Any:
    return parse_config(merged(yaml.safe_load(base.read_text(encoding="utf-8")), changes),
                        f"{base} + {json.dumps(changes)}", base.parent)


def run_variant(name: str, context: LoopContext, spans: Path, console: Console) -> dict[str, Any]:
    """Build, train, publish and evaluate one variant (or read it back when done)."""
    from tracelearn.training.grpo import train_grpo
    from tracelearn.training.sft import train_sft

    folder = context.workdir / "variants" / name
    done = folder / "done.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    trainer, changes, train_changes = VARIANTS[name]
    config = pipeline_for(context.spec.pipeline, changes)
    console.rule(f"{name}: build ({json.dumps(changes) or 'the loop pipeline'}), train {trainer} "
                 f"{json.dumps(train_changes) if train_changes else ''}")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=config.watermark.lateness_seconds + 1)
    built = build_transitions(spans, folder / "data", config, now=later)
    started = time.monotonic()
    train = train_grpo if trainer == "grpo" else train_sft
    base_train = yaml.safe_load(context.spec.train.read_text(encoding="utf-8")) if context.spec.train else {}
    train_config = parse_train_config(merged(base_train or {}, train_changes), str(context.spec.train or "defaults"))
    result = train(folder / "data", "registry:calc-policy@1", folder / "run", train_config,
                   config_hash=built.config_hash, overwrite=True, registry=context.registry)
    seconds = time.monotonic() - started
    lineage = Lineage.from_dict(json.loads(result.run.lineage_path.read_text(encoding="utf-8")))
    version = context.registry.publish("checkpoint", context.spec.name, result.checkpoint, lineage=lineage,
                                       metadata={"variant": name}).version
    evaluation = context.evaluations.result(version.ref)
    base = context.evaluations.result("calc-policy@1")
    record = {"variant": name, "trainer": trainer, "changes": changes, "train_changes": train_changes,
              "version": version.ref,
              "transitions": built.summary["transitions"], "sequences": result.summary["sequences"]["kept"],
              "steps": result.summary["steps"], "train_seconds": seconds,
              "behaviour": behaviour(evaluation).to_dict(), "vs_base": compare(evaluation, base).to_dict()}
    done.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def one_call(config: Path) -> LoopSpec:
    """The loop config on the original one-digit tasks, the agent without worked examples (default flags)."""
    raw = merged(yaml.safe_load(config.read_text(encoding="utf-8")), ONE_CALL)
    return parse_loop_spec(raw, config.resolve().parent, f"{config} (one-call task)")


def _rate(behaviour: dict[str, Any], key: str) -> str:
    low, high = behaviour[f"{key}_interval_95"]
    return f"{100 * behaviour[f'{key}_rate']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the loop config (agent, tasks, pipeline, train)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "learning-comparison")
    parser.add_argument("--limit", type=int, default=32, help="training tasks collected")
    parser.add_argument("--samples", type=int, default=4, help="samples per training task")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--task", choices=["tool", "one-call"], default="tool",
                        help="tool: the loop config's product tasks; one-call: the one-digit tasks, no examples")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tracelearn loop: spinning OpenMP threads on a shared CPU
    console = Console(width=160)
    spec = one_call(args.config) if args.task == "one-call" else load_loop_spec(args.config)
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
    by_name = {record["variant"]: record for record in records}
    if "grpo" in by_name and "sft" in by_name:
        grpo, sft = (context.evaluations.result(by_name[name]["version"]) for name in ("grpo", "sft"))
        versus = compare(grpo, sft)
        low, high = versus.interval
        console.print(f"grpo - sft, paired over {versus.pairs} rollouts: {100 * versus.difference:+.1f} points "
                      f"[{100 * low:+.1f}, {100 * high:+.1f}]")
    (workdir / "comparison.json").write_text(json.dumps({"base": base, "variants": records}, indent=2) + "\n",
                                             encoding="utf-8")


if __name__ == "__main__":
    main()
