"""Experience-pipeline throughput and memory, against Agent Lightning's TracerTraceToTriplet.

Issue 3: *"Build transitions from a generated spans dataset of at least 1 million spans ... report
spans per second and peak memory. Run Agent Lightning's own span-to-triplet adapter on the same
rollouts and print the ratio. Goal: at least 20x its throughput, with the same transitions and
rewards on the rollouts both understand. Peak memory on a dataset 10x the size grows far less than
10x (streaming works)."*

What it measures:

1. Datasets of N and 10N spans from ``benchmarks/spans_dataset.py`` (seeded; reused from
   ``--data-dir`` when a dataset of that size and seed is already there).
2. Ours: the public ``tracelearn.pipelines.build.build_transitions(spans, out, now=...)`` with the
   default config (identical credit, GRPO per task), each run in a fresh Python subprocess; wall time
   of the call alone (imports excluded) and the child's peak RSS (``os.wait4`` rusage ``ru_maxrss``,
   the whole process: interpreter, imports, polars' buffers). Throughput = input spans / wall time.
   Memory verdict: peak RSS at 10N / peak RSS at N below ``--memory-ratio-target`` (default 3x)
   counts as "far less than 10x".
3. Agent Lightning 0.3.0 (``benchmarks/.venv-agl``, made by ``setup_agentlightning.sh``): the first
   ``--sample-rollouts`` rollouts of the N dataset (whole GRPO groups) are copied into a small spans
   dataset; ``benchmarks/agentlightning_triplets.py`` runs its adapter on each rollout there (only the
   ``adapt`` calls are timed; reading and converting rows to its ``Span`` objects are reported
   apart). Its throughput = sample spans / adapt time. The adapter works rollout by rollout, so its
   per-span cost does not depend on dataset size: the N-dataset ratio uses that sample's rate
   (an extrapolation, printed as such). We also build the sample itself, for a same-rollouts ratio.
4. Equality on the sample: per rollout the same LLM calls (response ids ``chatcmpl-<span_id>``) in
   the same order, the same prompt and response token ids, and rewards: Agent Lightning's adapter
   puts the reward on the last call before the reward span and its trainer gives every call of the
   rollout that final reward (identical credit), so each of our transitions' ``credited_reward`` must
   equal the rollout's final reward in its triplets. Mismatches are printed.

    .venv/bin/python benchmarks/build_transitions.py               # N = 1,000,000 and 10,000,000
    .venv/bin/python benchmarks/build_transitions.py --quick       # N = 100,000 (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from spans_dataset import DatasetSpec, write_spans_dataset  # noqa: E402

AGL_PYTHON = REPO / "benchmarks" / ".venv-agl" / "bin" / "python"
AGL_SCRIPT = REPO / "benchmarks" / "agentlightning_triplets.py"
NOW = "2027-01-01T00:00:00+00:00"
THROUGHPUT_TARGET = 20.0

CHILD = """
import datetime as dt, json, sys, time
from tracelearn.pipelines.build import build_transitions
spans, out, now = sys.argv[1], sys.argv[2], dt.datetime.fromisoformat(sys.argv[3])
started = time.perf_counter()
result = build_transitions(spans, out, now=now)
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "summary": result.summary,
                  "transitions_files": [str(p) for p in result.transitions_files]}))
"""


def dataset_for(size: int, seed: int, data_dir: Path) -> Path:
    """The data root of the ``size``-span dataset with ``seed`` (generated if not there yet)."""
    root = data_dir / f"spans-{size}-seed{seed}"
    if (root / "spans").is_dir() and (root / "COMPLETE").exists():
        return root
    if (root / "spans").is_dir() and not (root / "COMPLETE").exists():
        shutil.rmtree(root / "spans")
    print(f"generating {size:,} spans (seed {seed}) under {root} ...", flush=True)
    started = time.perf_counter()
    counts = write_spans_dataset(DatasetSpec(size, seed), root)
    (root / "COMPLETE").write_text(json.dumps(counts))
    print(f"  {counts['spans']:,} spans, {counts['rollouts']:,} rollouts in {time.perf_counter() - started:.0f} s")
    return root


def count_spans(root: Path) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in (root / "spans").rglob("*.parquet"))


def run_build(spans_root: Path, out: Path) -> dict[str, Any]:
    """``build_transitions`` in a fresh subprocess: its JSON report plus ``peak_rss_mib``."""
    shutil.rmtree(out, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spans_root), str(out), NOW],
        stdout=subprocess.PIPE,
        cwd=REPO.parent,
        text=True,
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"build_transitions failed on {spans_root} (exit {process.returncode})")
    report: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    report["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return report


def write_sample(source: Path, target: Path, rollouts: int) -> int:
    """Copy the spans of rollouts ``r000000000`` .. ``r<rollouts - 1>`` into ``target/spans``; returns spans."""
    shutil.rmtree(target, ignore_errors=True)
    limit = f"r{rollouts:09d}"
    copied = 0
    for path in sorted((source / "spans").rglob("*.parquet")):
        table = pq.read_table(path)
        table = table.filter(pc.less(table["rollout_id"], limit))
        if table.num_rows:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, destination, compression="zstd")
            copied += table.num_rows
    return copied


def run_agentlightning(sample_root: Path, out_json: Path) -> dict[str, Any]:
    if not AGL_PYTHON.exists():
        raise SystemExit(f"{AGL_PYTHON} missing: run benchmarks/setup_agentlightning.sh first")
    # LiteLLM (an Agent Lightning dependency) fetches a model cost map at import unless told to use its own copy.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    subprocess.run([str(AGL_PYTHON), str(AGL_SCRIPT), "--spans", str(sample_root / "spans"), "--out", str(out_json)],
                   env=env)
    result: dict[str, Any] = json.loads(out_json.read_text())
    return result


def compare(ours_files: list[str], theirs: dict[str, list[dict[str, Any]]],
            calls: dict[str, str | None] | None = None) -> list[str]:
    """Mismatches between our transitions and Agent Lightning's triplets, rollout by rollout, call by call.

    A transition and a triplet name the same call by its response id: ``calls`` maps our span ids to
    them (the spans' ``response_id``); without it, the generated dataset's ``chatcmpl-<span_id>``.
    """
    ours = (
        pl.read_parquet(ours_files)
        .sort("rollout_id", "step_index")
        .select("rollout_id", "span_id", "prompt_token_ids", "response_token_ids", "credited_reward")
    )
    problems: list[str] = []
    grouped = {key[0]: frame.to_dicts() for key, frame in ours.group_by("rollout_id", maintain_order=True)}
    for rollout_id in sorted(set(grouped) | set(theirs)):
        rows, triplets = grouped.get(rollout_id, []), theirs.get(rollout_id, [])
        if len(rows) != len(triplets):
            problems.append(f"{rollout_id}: {len(rows)} transitions vs {len(triplets)} triplets")
            continue
        rewards = [t["reward"] for t in triplets if t["reward"] is not None]
        final = rewards[-1] if rewards else None
        for step, (row, triplet) in enumerate(zip(rows, triplets, strict=True)):
            call = calls.get(row["span_id"]) if calls is not None else f"chatcmpl-{row['span_id']}"
            if triplet["response_id"] != call:
                problems.append(f"{rollout_id} step {step}: call {call} vs {triplet['response_id']}")
            if list(row["prompt_token_ids"] or []) != triplet["prompt_token_ids"]:
                problems.append(f"{rollout_id} step {step}: prompt token ids differ")
            if list(row["response_token_ids"] or []) != triplet["response_token_ids"]:
                problems.append(f"{rollout_id} step {step}: response token ids differ")
            if row["credited_reward"] != final:
                problems.append(f"{rollout_id} step {step}: credited reward {row['credited_reward']} vs final {final}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000, help="N; the second dataset has 10N spans")
    parser.add_argument("--quick", action="store_true", help="N = 100,000 (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/tracelearn-bench"))
    parser.add_argument("--sample-rollouts", type=int, default=2_000, help="rollouts given to Agent Lightning")
    parser.add_argument("--memory-ratio-target", type=float, default=3.0)
    parser.add_argument("--skip-10x", action="store_true", help="only the N dataset")
    args = parser.parse_args(argv)
    n = 100_000 if args.quick else args.spans
    sizes = [n] if args.skip_10x else [n, 10 * n]
    args.data_dir.mkdir(parents=True, exist_ok=True)

    ours: dict[int, dict[str, Any]] = {}
    for size in sizes:
        root = dataset_for(size, args.seed, args.data_dir)
        spans = count_spans(root)
        print(f"build_transitions on {spans:,} spans (fresh subprocess) ...", flush=True)
        report = run_build(root, args.data_dir / f"out-{size}-seed{args.seed}")
        report["spans"] = spans
        ours[size] = report
        print(
            f"  ours: {report['seconds']:.1f} s, {spans / report['seconds']:,.0f} spans/s, "
            f"peak RSS {report['peak_rss_mib']:,.0f} MiB, {report['summary']['transitions']:,} transitions, "
            f"{report['summary']['rollouts']:,} rollouts, {report['summary']['buckets']} bucket(s)",
            flush=True,
        )

    sample_root = args.data_dir / f"sample-{n}-seed{args.seed}-{args.sample_rollouts}"
    sample_spans = write_sample(args.data_dir / f"spans-{n}-seed{args.seed}", sample_root, args.sample_rollouts)
    print(f"Agent Lightning sample: {args.sample_rollouts:,} rollouts, {sample_spans:,} spans", flush=True)
    theirs = run_agentlightning(sample_root, args.data_dir / "agentlightning-triplets.json")
    timings = theirs["timings"]
    sample_ours = run_build(sample_root, args.data_dir / "out-sample")
    problems = compare(sample_ours["transitions_files"], theirs["rollouts"])

    theirs_rate = timings["spans"] / timings["adapt_s"]
    same_rate = sample_spans / sample_ours["seconds"]
    n_rate = ours[n]["spans"] / ours[n]["seconds"]
    print()
    print(f"Agent Lightning 0.3.0 TracerTraceToTriplet (Python {timings['python']}), {timings['rollouts']:,} rollouts:")
    print(
        f"  adapt {timings['adapt_s']:.2f} s = {theirs_rate:,.0f} spans/s; "
        f"(not counted: reading {timings['read_s']:.2f} s, "
        f"converting rows to Span objects {timings['convert_s']:.2f} s)"
    )
    print(f"ours on the same rollouts: {sample_ours['seconds']:.2f} s = {same_rate:,.0f} spans/s")
    print()
    print(f"{'dataset':>12} {'spans/s':>12} {'peak RSS MiB':>13}")
    for size in sizes:
        report = ours[size]
        print(f"{report['spans']:>12,} {report['spans'] / report['seconds']:>12,.0f} {report['peak_rss_mib']:>13,.0f}")
    print()
    print(f"equality on {len(theirs['rollouts']):,} shared rollouts: {len(problems)} mismatch(es)")
    for problem in problems[:20]:
        print(f"  {problem}")
    # Ours always includes reading Parquet and writing Parquet; the first two ratios compare that with
    # Agent Lightning's adapter alone (its favourable case), the last with its reading + converting +
    # adapting, the same work from files on disk to transitions.
    theirs_end_to_end = timings["spans"] / (timings["read_s"] + timings["convert_s"] + timings["adapt_s"])
    for label, rate, base in (
        ("same rollouts, vs its adapter alone", same_rate, theirs_rate),
        (f"{ours[n]['spans']:,}-span build, vs its adapter alone (extrapolated)", n_rate, theirs_rate),
        (f"{ours[n]['spans']:,}-span build, vs its read+convert+adapt (extrapolated)", n_rate, theirs_end_to_end),
    ):
        ratio = rate / base
        verdict = "PASS" if ratio >= THROUGHPUT_TARGET else "BELOW TARGET"
        print(f"throughput ratio, {label}: {ratio:.1f}x (target {THROUGHPUT_TARGET:.0f}x): {verdict}")
    if len(sizes) == 2:
        memory_ratio = ours[10 * n]["peak_rss_mib"] / ours[n]["peak_rss_mib"]
        verdict = "PASS" if memory_ratio < args.memory_ratio_target else "BELOW TARGET"
        print(
            f"peak memory 10N / N: {memory_ratio:.2f}x (target < {args.memory_ratio_target:.0f}x, "
            f"'far less than 10x'): {verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
