"""Calibrate the tool task: how often the base policy calls the calculator, and solves, per prompt variant.

The calc agent (``examples/calc/agent.py``, unmodified-style: no tracelearn import) runs on the product
tasks (two two-digit numbers; the policy cannot multiply them in its head) against ``tracelearn serve``,
once per variant; a variant is a set of agent flags (``--few-shot N``, ``--temperature T``, ...). The
agent prints one JSON line per rollout with ``correct``, ``tool_calls`` and ``turns``; the table gives,
per variant, the share of rollouts that called the tool and that were right, each with its Wilson 95%
interval, the mean model calls per rollout, and the share of tasks whose samples disagree (GRPO groups
with a learning signal).

    .venv/bin/python benchmarks/calc_calibration.py --limit 20 --samples 2 \\
        --variant "--few-shot 0" --variant "--few-shot 1" --variant "--few-shot 2" \\
        --variant "--few-shot 2 --temperature 1.0"

No instrumentation is involved (the agent's OpenTelemetry API calls are no-ops here): this measures the
policy, not the capture.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tracelearn.processes import console_script, free_port, start_child
from tracelearn.training.eval_results import wilson_interval
from tracelearn.training.eval_serving import model_cards

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "examples" / "calc" / "agent.py"
TASKS = REPO / "examples" / "calc" / "products_heldout.jsonl"


@dataclass(frozen=True)
class VariantResult:
    flags: str
    rows: list[dict[str, Any]]
    seconds: float

    def rate(self, key: str) -> tuple[int, int]:
        hits = sum(1 for row in self.rows if (row[key] > 0 if key == "tool_calls" else row[key]))
        return hits, len(self.rows)

    def mixed_tasks(self) -> tuple[int, int]:
        outcomes: dict[str, set[bool]] = {}
        for row in self.rows:
            outcomes.setdefault(str(row["id"]), set()).add(bool(row["correct"]))
        return sum(1 for seen in outcomes.values() if len(seen) == 2), len(outcomes)


def _cell(hits: int, n: int) -> str:
    low, high = wilson_interval(hits, n)
    return f"{100 * hits / max(n, 1):.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def run_variant(base_url: str, model: str, flags: str, args: argparse.Namespace, workdir: Path) -> VariantResult:
    command = [sys.executable, str(AGENT), "--tasks", str(args.tasks), "--limit", str(args.limit), "--samples",
               str(args.samples), "--seed", str(args.seed), "--concurrency", str(args.concurrency), "--model", model,
               *shlex.split(flags)]
    lines: list[dict[str, Any]] = []

    def keep(line: str) -> None:
        if line.startswith("{"):
            lines.append(json.loads(line))

    started = time.monotonic()
    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "not-needed", "PATH": "/usr/bin:/bin"}
    log = workdir / f"agent-{len(list(workdir.glob('agent-*')))}.log"
    start_child(command, name="the agent", log=log, env=env, on_line=keep).check(args.timeout)
    return VariantResult(flags, lines, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", type=Path, default=TASKS)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--variant", action="append", default=[], help="agent flags of one variant (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the table here")
    args = parser.parse_args()
    variants = args.variant or ["--few-shot 0", "--few-shot 1", "--few-shot 2"]
    console = Console()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory(prefix="calc-calibration-") as scratch:
        workdir = Path(scratch)
        # Passive OpenMP waiting: on a shared CPU, spinning threads slow a server down several times over.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        server = start_child([console_script("tracelearn"), "serve", "--model", args.model, "--port", str(port),
                              "--max-batch-size", "16"], name="the model server", log=workdir / "server.log", env=env)
        with server:
            server.wait_until(lambda: True if _answers(base_url) else None, 300, "it was ready")
            model = str(model_cards(base_url)[0]["id"])
            results = []
            for flags in variants:
                console.print(f"variant {flags!r}: {args.limit} tasks x {args.samples} samples ...")
                results.append(run_variant(base_url, model, flags, args, workdir))
    table = Table(title=f"tool task calibration: {args.tasks.name}, {args.limit} tasks x {args.samples} samples, "
                        f"seed {args.seed} (95% Wilson intervals)")
    for column in ("agent flags", "tool calls", "success", "LLM calls / rollout", "tasks with mixed outcomes", "s"):
        table.add_column(column)
    for result in results:
        mixed, tasks = result.mixed_tasks()
        turns = sum(int(row["turns"]) for row in result.rows) / max(len(result.rows), 1)
        table.add_row(result.flags or "(none)", _cell(*result.rate("tool_calls")), _cell(*result.rate("correct")),
                      f"{turns:.2f}", f"{mixed}/{tasks}", f"{result.seconds:.0f}")
    console.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps([{"flags": r.flags, "seconds": r.seconds, "rows": r.rows} for r in results],
                                        indent=1), encoding="utf-8")


def _answers(base_url: str) -> bool:
    try:
        model_cards(base_url, timeout_s=2.0)
    except Exception:
        return False
    return True


if __name__ == "__main__":
    main()
