"""tracelearn and Agent Lightning side by side, in one command: the numbers docs/agent-lightning.md quotes.

Agent Lightning 0.3.0 runs from its own package in its own venv (``benchmarks/.venv-agl``, made by
``benchmarks/setup_agentlightning.sh``); nothing of it is re-implemented here. Parts (``--parts``):

- ``transitions``: the same rollouts through both span-to-training-data paths. Ours: the public
  ``build_transitions`` (Parquet in, credited transitions out, default config: every LLM call, identical
  credit). Theirs: ``TracerTraceToTriplet().adapt`` per rollout (``benchmarks/agentlightning_triplets.py``,
  our rows mapped to its ``Span`` objects as its AgentOps tracer records them). The rollouts are a
  captured spans dataset (``--captured DIR``: e.g. a demo run's ``runs/demo-*/data``, the calc agent
  against SmolLM2) and/or a generated multi-agent dataset (``--generated N`` spans, seeded, from
  ``benchmarks/spans_dataset.py``). Reported: rollouts, transitions vs triplets, agreement call by call
  (same calls in the same order, same prompt and response token ids, our credited reward equal to the
  final reward of its triplets), and throughput in spans per second (ours files to files; theirs its
  ``adapt`` alone and its read + convert + adapt).
- ``ingest``: OTLP/HTTP ingest of the same realistic LLM spans by our collector sidecar (durable: acknowledged
  after fsync) and by ``agl store`` (in memory), same bodies, client and concurrency; and durability
  after ``kill -9`` mid-stream: acknowledged spans missing or duplicated after the restart (both from
  ``benchmarks/collector_ingest.py``).
- ``features``: what each system does, as a table (facts checked against Agent Lightning 0.3.0's
  package and docs; see ``FEATURES``).

    .venv/bin/python benchmarks/compare_agent_lightning.py                        # all parts (~5 min)
    .venv/bin/python benchmarks/compare_agent_lightning.py --captured runs/demo-X/data --parts transitions
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from build_transitions import (  # noqa: E402
    AGL_PYTHON,
    compare,
    count_spans,
    dataset_for,
    run_agentlightning,
    run_build,
    write_sample,
)

PARTS = ("transitions", "ingest", "features")

# (capability, tracelearn, Agent Lightning 0.3.0). Theirs from its package: agentlightning.store
# (memory and MongoDB backends; sqlite.py is an empty "TODO"), agentlightning.adapter, .algorithm
# (apo, verl), .tracer (AgentOps, OpenTelemetry), .llm_proxy (LiteLLM).
FEATURES: tuple[tuple[str, str, str], ...] = (
    ("capture an unmodified agent", "opentelemetry-instrument, no code change", "agl tracer / LLM proxy in the runner"),
    ("non-Python agents", "any OTLP SDK -> collector sidecar (HTTP + gRPC)", "OTLP/HTTP to agl store (its ids needed)"),
    ("span storage", "Parquet dataset (hive date/service), polars / DuckDB", "in memory or MongoDB"),
    ("durability", "acked = fsync'd spool; replay after kill -9; dedup", "memory store: lost on exit"),
    ("token ids", "server ids + logprobs per call; status when absent", "ids from vLLM via its proxy"),
    ("span -> training data", "programmable stages over LazyFrames, streaming", "adapter per rollout, in Python"),
    ("credit assignment", "identical, discounted, last-only, per-agent; GRPO", "final reward on every call"),
    ("training", "GRPO + SFT in torch (CPU/GPU), verl backend", "verl (GPU)"),
    ("prompt optimization", "APO beam search, paired test, registry publish", "APO (textual gradients)"),
    ("artifact registry", "versioned, content-addressed, aliases, lineage", "none (checkpoints on disk)"),
    ("serving", "embedded server follows an alias, hot swap; vLLM", "vLLM via verl"),
    ("scheduling", "Airflow DAGs (build, train, gate, APO)", "its own trainer loop"),
    ("promotion gate", "held-out eval, paired interval, audit log", "none"),
)


@dataclass(frozen=True)
class TransitionsComparison:
    """One dataset through both paths."""

    source: str
    spans: int
    rollouts: int
    transitions: int
    triplets: int
    mismatches: list[str]
    ours_spans_per_s: float
    theirs_adapt_spans_per_s: float
    theirs_end_to_end_spans_per_s: float


def response_ids(spans_root: Path) -> dict[str, str | None]:
    """``span_id -> gen_ai.response.id`` of the LLM spans: how a transition and a triplet name the same call."""
    frame = (pl.scan_parquet(spans_root / "spans" / "**" / "*.parquet", hive_partitioning=True)
             .filter(pl.col("span_type") == "llm").select("span_id", "response_id").collect())
    return dict(zip(frame["span_id"].to_list(), frame["response_id"].to_list(), strict=True))


def compare_transitions(source: str, spans_root: Path, work: Path) -> TransitionsComparison:
    """Both paths over the spans under ``spans_root/spans``; scratch files under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    spans = count_spans(spans_root)
    print(f"[transitions] {source}: {spans:,} spans; ours (fresh subprocess) ...", flush=True)
    ours = run_build(spans_root, work / "ours")
    print("[transitions] Agent Lightning's TracerTraceToTriplet (its venv) ...", flush=True)
    theirs = run_agentlightning(spans_root, work / "agentlightning-triplets.json")
    timings = theirs["timings"]
    problems = compare(ours["transitions_files"], theirs["rollouts"], response_ids(spans_root))
    return TransitionsComparison(
        source=source,
        spans=spans,
        rollouts=int(ours["summary"]["rollouts"]),
        transitions=int(ours["summary"]["transitions"]),
        triplets=sum(len(t) for t in theirs["rollouts"].values()),
        mismatches=problems,
        ours_spans_per_s=spans / ours["seconds"],
        theirs_adapt_spans_per_s=timings["spans"] / timings["adapt_s"],
        theirs_end_to_end_spans_per_s=timings["spans"]
        / (timings["read_s"] + timings["convert_s"] + timings["adapt_s"]),
    )


def print_transitions(results: list[TransitionsComparison]) -> None:
    print("\nspans -> training data, same rollouts")
    header = (f"{'rollouts from':<34} {'spans':>9} {'rollouts':>8} {'ours':>7} {'theirs':>7} {'agree':>6} "
              f"{'ours spans/s':>13} {'theirs adapt':>13} {'theirs e2e':>11} {'ratio e2e':>9}")
    print(header)
    for r in results:
        agree = "yes" if not r.mismatches else f"{len(r.mismatches)} diff"
        ratio = r.ours_spans_per_s / r.theirs_end_to_end_spans_per_s
        print(f"{r.source:<34} {r.spans:>9,} {r.rollouts:>8,} {r.transitions:>7,} {r.triplets:>7,} {agree:>6} "
              f"{r.ours_spans_per_s:>13,.0f} {r.theirs_adapt_spans_per_s:>13,.0f} "
              f"{r.theirs_end_to_end_spans_per_s:>11,.0f} {ratio:>8.1f}x")
        for problem in r.mismatches[:10]:
            print(f"    {problem}")
    print("  ours: Parquet files in -> credited transitions Parquet out (fresh process, imports excluded); "
          "theirs e2e: read + convert to Span + adapt, adapt: the adapter alone on spans already in memory")


def print_features() -> None:
    width = max(len(f[0]) for f in FEATURES)
    ours_width = max(len(f[1]) for f in FEATURES)
    print("\nfeatures")
    print(f"{'':<{width}}  {'tracelearn':<{ours_width}}  Agent Lightning 0.3.0")
    for capability, ours, theirs in FEATURES:
        print(f"{capability:<{width}}  {ours:<{ours_width}}  {theirs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--captured", type=Path, action="append", default=[],
                        help="a captured dataset root (holding spans/), repeatable")
    parser.add_argument("--generated", type=int, default=100_000, help="spans of the generated dataset (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tracelearn-compare"))
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere (smoke run)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if ("transitions" in parts or "ingest" in parts) and not AGL_PYTHON.exists():
        parser.error(f"{AGL_PYTHON} is missing: run benchmarks/setup_agentlightning.sh first")
    for root in args.captured:
        if not (root / "spans").is_dir():
            parser.error(f"--captured {root}: no spans/ directory there")
    started = time.perf_counter()
    if "transitions" in parts:
        results = []
        for index, root in enumerate(args.captured):
            root = root.resolve()  # the builds run in subprocesses with their own working directory
            results.append(compare_transitions(f"captured {root.parent.name}/{root.name}", root,
                                               args.work / f"captured-{index}"))
        generated = 20_000 if args.quick else args.generated
        if generated:
            dataset = dataset_for(generated, args.seed, args.work / "datasets")
            # Agent Lightning's adapter works rollout by rollout in Python; 2,000 rollouts (~27k spans)
            # measure its rate well and keep its part of the run to seconds.
            sample = args.work / "generated-sample"
            write_sample(dataset, sample, 2_000)
            results.append(compare_transitions(f"generated multi-agent (seed {args.seed})", sample,
                                               args.work / "generated"))
        print_transitions(results)
    if "ingest" in parts:
        import collector_ingest

        # The same bodies, client and concurrency against both servers, then kill -9 of each mid-stream.
        collector_ingest.main(["--parts", "compare", "crash", "--mix", "llm", *(["--quick"] if args.quick else [])])
    if "features" in parts:
        print_features()
    print(f"\ncompare_agent_lightning: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
