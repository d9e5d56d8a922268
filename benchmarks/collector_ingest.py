"""Collector sidecar under OTLP/HTTP load: durable ingest throughput, Agent Lightning's store side by side,
backpressure under many clients, and what survives a ``kill -9``.

Targets (issue 6, "Performance"):

* **ingest**: spans per CPU-second of the sidecar process (``tracelearn collector serve``), durable
  (a request is answered 200 only after its body is fsynced into the write-ahead request log) and
  converted into Parquet (behind the answers, ``TRACELEARN_ROLL_SECONDS`` 2 s here): the verdict
  counts the server's CPU until every acknowledged span is in Parquet. Goal: >= 20,000 spans per
  CPU-second on the 2-core development machine. After the run the sidecar is stopped with SIGTERM
  and every acknowledged span is looked up in the Parquet dataset: present exactly once.
* **compare**: the same bodies, the same client, the same concurrency against Agent Lightning 0.3.0's
  store server (``agl store``, OTLP/HTTP protobuf on ``/v1/traces``, in ``benchmarks/.venv-agl``):
  ratio of throughput (ours / agl), goal >= 3x, while ours is durable and its memory backend is not.
* **load**: many concurrent clients (64 connections) for a bounded time against a sidecar with a small
  write queue (``--queue-bytes``), so it answers 429 with ``Retry-After``; clients wait as told and
  resend. Reports accepted, rejected-with-retry, p50/p99 latency, and that no acknowledged span is lost.
* **crash**: clients ingest, the server is SIGKILLed mid-stream, restarted on the same data, and the
  bodies not acknowledged before the kill are resent (as an OTLP client retries); counts acknowledged
  spans missing and duplicated, for ours and for ``agl store`` (which keeps spans in memory).

The spans are real SDK spans of whole agent rollouts (``exporter_cost.build_spans``: a workflow root,
4-6 Traceloop 0.62 ``openai.chat`` spans with ``gen_ai.input.messages`` / ``gen_ai.output.messages``
JSON over a growing conversation, token counts, tool spans, a reward span, rollout identity on every
span; ~2.5 KB per span encoded, ~4.8 KB per LLM span), encoded once with the SDK's OTLP encoder into
``ExportTraceServiceRequest`` bodies of ``--batch`` spans (512: what ``BatchSpanProcessor`` sends).
Each span also carries ``agentlightning.rollout_id`` / ``agentlightning.attempt_id`` naming a rollout
that exists in the agl store (it drops spans without them, and refuses unknown rollouts), for both
targets. Every body sent is unique: body ``k`` is template ``k % T`` with the first 4 bytes of its
trace and span ids (parents too) replaced by the copy number ``k // T`` and the tracelearn rollout and
attempt ids suffixed with it, so no server sees a duplicate it could skip cheaply.

The load generator runs in separate processes (``multiprocessing`` spawn), each with its own
keep-alive ``http.client`` connections (one thread per connection), so it never shares the server's
GIL. Server CPU is read from ``/proc/PID/stat`` (utime + stime of the server process and its
descendants) when the clients start and when the last one finishes; for the sidecar also when
``/metrics`` says every acknowledged span is in Parquet (``spans_awaiting_conversion`` 0), and
through its exit (``os.wait4``). Nothing is asserted on timings: the script prints ratios and PASS /
BELOW TARGET lines.

    .venv/bin/python benchmarks/collector_ingest.py                      # all parts (~3 min)
    .venv/bin/python benchmarks/collector_ingest.py --quick              # short run of every part (~1 min)
    .venv/bin/python benchmarks/collector_ingest.py --parts ingest compare --spans 300000 --clients 8
    .venv/bin/python benchmarks/collector_ingest.py --parts load --load-seconds 60 --queue-bytes 4194304
    .venv/bin/python benchmarks/collector_ingest.py --parts crash

Importable (``sys.path`` holding ``benchmarks/``): ``build_workload``, ``measure_ingest``,
``compare_with_agl``, ``load_test``, ``crash_durability`` and their result dataclasses, from here or
from the modules that hold them: ``collector_workload`` (bodies), ``collector_servers`` (the servers as
processes), ``collector_clients`` (the load generator), ``collector_parts`` (the parts and the dataset
check); this file prints the report and holds the command line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules; spawned client processes re-import them
    sys.path.insert(0, str(HERE))

from collector_clients import ClientPlan, ClientReport, ClientRun, run_clients  # noqa: E402
from collector_parts import (  # noqa: E402
    ComparisonResult,
    CrashResult,
    DatasetCheck,
    IngestResult,
    LoadResult,
    check_dataset,
    compare_with_agl,
    crash_durability,
    dataset_key_counts,
    load_test,
    measure_ingest,
    percentile,
)
from collector_servers import (  # noqa: E402
    DEFAULT_AGL,
    ServerProcess,
    Target,
    create_agl_rollouts,
    start_agl_store,
    start_sidecar,
)
from collector_workload import (  # noqa: E402
    AGL_ATTEMPT_ID,
    AGL_ROLLOUT_ID,
    MIXES,
    AglIdentity,
    BodyMaker,
    Mix,
    Workload,
    build_workload,
    decode_rows_rate,
    llm_call_spans,
    placeholder_identities,
)

__all__ = [
    "AGL_ATTEMPT_ID",
    "AGL_ROLLOUT_ID",
    "AglIdentity",
    "BodyMaker",
    "ClientPlan",
    "ClientReport",
    "ClientRun",
    "ComparisonResult",
    "CrashResult",
    "DatasetCheck",
    "IngestResult",
    "LoadResult",
    "ServerProcess",
    "Workload",
    "build_workload",
    "check_dataset",
    "compare_with_agl",
    "crash_durability",
    "create_agl_rollouts",
    "dataset_key_counts",
    "decode_rows_rate",
    "llm_call_spans",
    "load_test",
    "main",
    "measure_ingest",
    "placeholder_identities",
    "run_clients",
    "start_agl_store",
    "start_sidecar",
]

GOAL_SPANS_PER_CPU_SECOND = 20_000
GOAL_RATIO_VS_AGL = 3.0


# --- Report ---------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "BELOW TARGET"


def print_ingest_table(results: Sequence[IngestResult]) -> None:
    head = (f"{'target':<24}{'clients':>8}{'spans acked':>13}{'wall s':>8}{'server CPU s':>14}"
            f"{'spans/CPU-s':>13}{'spans/s wall':>14}{'p50 ms':>8}{'p99 ms':>8}{'disk MiB':>10}  durable")
    print(head)
    print("-" * len(head))
    for r in results:
        name = "tracelearn sidecar" if r.target == "tracelearn" else "agl store (memory)"
        print(f"{name:<24}{r.clients:>8}{r.spans_acked:>13,}{r.wall_s:>8.2f}{r.server_cpu_s:>14.2f}"
              f"{r.spans_per_cpu_s:>13,.0f}{r.spans_per_wall_s:>14,.0f}{r.p50_ms:>8.0f}{r.p99_ms:>8.0f}"
              f"{r.write_bytes / 2**20:>10.0f}  {'yes (fsync before 200)' if r.durable else 'no (memory only)'}")
        if r.target == "tracelearn" and r.server_cpu_in_parquet_s:
            in_parquet = r.spans_per_cpu_s_in_parquet or math.nan
            print(f"{'  ... all in Parquet':<24}{'':>8}{'':>13}{'':>8}{r.server_cpu_in_parquet_s:>14.2f}"
                  f"{in_parquet:>13,.0f}   (adds the conversion into Parquet, behind the answers)")
        if r.target == "tracelearn" and r.server_cpu_through_exit_s:
            through = r.spans_per_cpu_s_through_exit or math.nan
            print(f"{'  ... through its exit':<24}{'':>8}{'':>13}{'':>8}{r.server_cpu_through_exit_s:>14.2f}"
                  f"{through:>13,.0f}   (adds the shutdown)")


def print_ingest_details(r: IngestResult) -> None:
    for note in r.notes:
        print(f"  {note}")
    rep = r.report
    if rep.errors or rep.failed or rep.unanswered or rep.partial_rejected_spans or rep.rejected_attempts:
        print(f"  client: statuses {dict(rep.statuses)}, connection errors {rep.errors}, failed bodies "
              f"{len(rep.failed)}, unanswered {len(rep.unanswered)}, partial-success rejected spans "
              f"{rep.partial_rejected_spans}; {rep.error_samples}")
    if r.check is not None:
        c = r.check
        print(f"  dataset: {c.rows:,} rows in {c.files} Parquet files; acknowledged {c.acknowledged:,}: missing "
              f"{c.missing}, duplicated {c.duplicated}, rows never acknowledged {c.unacknowledged_rows}"
              f" -> {'every acknowledged span exactly once' if c.exact else 'NOT EXACT'}")
    elif r.target == "agl":
        print(f"  store: {r.stored_spans:,} spans held for {r.spans_acked:,} acknowledged "
              f"({'all' if r.stored_spans == r.spans_acked else 'NOT all'}); "
              f"{r.write_bytes / 2**20:.1f} MiB written to storage by its process during the run")


def print_ingest_verdict(r: IngestResult, gauge: float | None = None) -> None:
    # Judged on spans in Parquet per CPU-second: acknowledging is cheaper, but the conversion must keep up.
    rate = r.spans_per_cpu_s_in_parquet or math.nan
    share = f"; {rate / gauge:.2f} of the decode + rows gauge" if gauge else ""
    print(f"{verdict(rate >= GOAL_SPANS_PER_CPU_SECOND and bool(r.check and r.check.exact))}: "
          f"ingest {rate:,.0f} spans per server CPU-second all the way into Parquet = "
          f"{rate / GOAL_SPANS_PER_CPU_SECOND:.2f}x the goal of {GOAL_SPANS_PER_CPU_SECOND:,} (acknowledged, durable "
          f"in the request log: {r.spans_per_cpu_s:,.0f}{share}); every acknowledged span in Parquet exactly once: "
          f"{'yes' if r.check and r.check.exact else 'NO'}")


def print_comparison(c: ComparisonResult) -> None:
    print(f"ratio ours / agl store: {c.ratio:.2f}x spans per wall second, {c.cpu_ratio:.2f}x spans per server "
          f"CPU-second (same bodies, same client, {c.ours.clients} connections)")
    print(f"{verdict(c.ratio >= GOAL_RATIO_VS_AGL)}: {c.ratio:.2f}x agl store's throughput (goal >= "
          f"{GOAL_RATIO_VS_AGL:.0f}x), ours durable (fsync before each 200, {c.ours.write_bytes / 2**20:.0f} MiB "
          f"written), agl not ({c.agl.write_bytes / 2**20:.1f} MiB written; its memory backend keeps spans in "
          f"process memory, the only other backend is MongoDB)")


def print_load(r: LoadResult) -> None:
    rep = r.report
    e2e = rep.body_latency_s
    print(f"{'connections':>12}{'seconds':>9}{'queue MiB':>11}{'accepted req':>14}{'spans acked':>13}"
          f"{'rejected 429/503':>18}{'abandoned':>11}{'errors':>8}{'p50 ms':>8}{'p99 ms':>8}{'spans/s':>9}")
    print(f"{r.connections:>12}{r.wall_s:>9.1f}{r.queue_bytes / 2**20:>11.0f}{r.accepted_requests:>14,}"
          f"{r.spans_acked:>13,}{r.rejected_with_retry:>18,}{len(rep.abandoned):>11}{rep.errors:>8}"
          f"{percentile(rep.accepted_latency_s, 50) * 1e3:>8.0f}{percentile(rep.accepted_latency_s, 99) * 1e3:>8.0f}"
          f"{r.spans_acked / r.wall_s:>9,.0f}")
    print(f"  statuses {dict(rep.statuses)}; accepted attempt latency p50/p99 "
          f"{percentile(rep.accepted_latency_s, 50) * 1e3:.0f}/{percentile(rep.accepted_latency_s, 99) * 1e3:.0f} ms; "
          f"rejected answered in p50/p99 {percentile(rep.rejected_latency_s, 50) * 1e3:.1f}/"
          f"{percentile(rep.rejected_latency_s, 99) * 1e3:.1f} ms; per body with retries p50/p99 "
          f"{percentile(e2e, 50) * 1e3:.0f}/{percentile(e2e, 99) * 1e3:.0f} ms; "
          f"server CPU {r.server_cpu_s:.1f} s ({r.spans_acked / max(r.server_cpu_s, 1e-9):,.0f} spans/CPU-s)")
    if rep.error_samples:
        print(f"  client errors: {rep.error_samples}")
    c = r.check
    print(f"  dataset: {c.rows:,} rows; acknowledged {c.acknowledged:,}: missing {c.missing}, duplicated "
          f"{c.duplicated}, rows never acknowledged {c.unacknowledged_rows}")
    backpressure = r.rejected_with_retry > 0
    print(f"{verdict(c.exact and backpressure)}: load test, {r.connections} clients: zero acknowledged spans lost "
          f"({'yes' if c.exact else 'NO'}); backpressure answered with Retry-After "
          f"({r.rejected_with_retry:,} times{'' if backpressure else ': never triggered, lower --queue-bytes'})")


def print_crash(results: Sequence[CrashResult]) -> None:
    print(f"{'target':<24}{'acked before kill':>19}{'in flight':>11}{'resent':>9}{'missing':>9}{'lost':>7}"
          f"{'duplicated':>12}{'restart s':>11}")
    for r in results:
        name = "tracelearn sidecar" if r.target == "tracelearn" else "agl store (memory)"
        print(f"{name:<24}{r.spans_acked_before_kill:>19,}{r.bodies_unanswered_at_kill:>11}"
              f"{r.spans_resent_after_restart:>9,}{r.spans_missing:>9,}{r.lost_share:>7.0%}{r.spans_duplicated:>12}"
              f"{r.restart_s:>11.1f}")
        for note in r.notes:
            print(f"  {r.target}: {note}")
    for r in results:
        if r.target == "tracelearn":
            ok = r.spans_missing == 0 and r.spans_duplicated == 0
            print(f"{verdict(ok)}: after kill -9 and restart, {r.spans_missing} of {r.spans_acked_before_kill:,} "
                  f"acknowledged spans missing, {r.spans_duplicated} duplicated (resent bodies included)")


PARTS = ("ingest", "compare", "load", "crash")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="short run of every selected part")
    parser.add_argument("--spans", type=int, help="spans per ingest run (default 150000; --quick 30000)")
    parser.add_argument("--batch", type=int, default=512, help="spans per request (default 512)")
    parser.add_argument("--mix", nargs="+", choices=MIXES,
                        help="span mixes of the ingest part (default: both; --quick: llm); the first one also drives "
                             "compare, load and crash")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connections for ingest/compare/crash, "
                        "one client process each (default 4)")
    parser.add_argument("--load-connections", type=int, default=64)
    parser.add_argument("--load-processes", type=int, default=4, help="client processes of the load test")
    parser.add_argument("--load-seconds", type=float, help="load test duration (default 30; --quick 8)")
    parser.add_argument("--queue-bytes", type=int, default=8 * 2**20,
                        help="the sidecar's --queue-bytes in the load test (default 8 MiB: ~4 bodies of the llm mix)")
    parser.add_argument("--crash-spans", type=int, help="spans of the crash run (default 60000; --quick 15000)")
    parser.add_argument("--agl", type=Path, default=DEFAULT_AGL, help="the agl command (benchmarks/.venv-agl)")
    parser.add_argument("--workdir", type=Path, help="keep servers' data and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    mixes: list[Mix] = args.mix or (["llm"] if args.quick else list(MIXES))
    spans = args.spans or (30_000 if args.quick else 150_000)
    load_seconds = args.load_seconds or (8.0 if args.quick else 30.0)
    crash_spans = args.crash_spans or (15_000 if args.quick else 60_000)
    have_agl = args.agl.exists()
    if not have_agl and ("compare" in args.parts or "crash" in args.parts):
        print(f"note: {args.agl} not found (bash benchmarks/setup_agentlightning.sh): agl runs skipped")

    started = time.perf_counter()
    workloads = {mix: build_workload(spans, args.batch, mix=mix) for mix in mixes}
    workload = workloads[mixes[0]]
    for mix, each in workloads.items():
        print(f"workload {mix}: {each.bodies} unique bodies of {args.batch} spans ({each.spans:,} spans, "
              f"{each.traces} rollouts in {len(each.templates)} templates), {each.bytes_per_span:,.0f} B/span OTLP "
              f"protobuf, {each.bytes_per_span * args.batch / 2**20:.2f} MiB/body")
    print(f"built in {time.perf_counter() - started:.1f} s; machine: {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    gauges = {mix: decode_rows_rate(each) for mix, each in workloads.items()}
    for mix, gauge in gauges.items():
        print(f"gauge, {mix} mix: the sidecar's decode + rows alone, in this process: {gauge:,.0f} spans/CPU-s "
              f"(its ceiling before HTTP, spool and Parquet; varies with the machine's state)")

    def sub(name: str) -> Path | None:
        return args.workdir / name if args.workdir else None

    if "ingest" in args.parts or ("compare" in args.parts and have_agl):
        for index, (mix, each) in enumerate(workloads.items()):
            compare = index == 0 and "compare" in args.parts and have_agl
            if not compare and "ingest" not in args.parts:
                continue
            print(f"\n== ingest, {mix} mix: durable OTLP/HTTP protobuf, spans per server CPU-second ==")
            if compare:
                comparison = compare_with_agl(spans, args.clients, args.batch, sub(f"compare-{mix}"), args.agl, each)
                results = [comparison.ours, comparison.agl]
            else:
                results = [measure_ingest("tracelearn", each, args.clients, sub(f"ingest-{mix}"))]
            print_ingest_table(results)
            for result in results:
                print(f"{result.target}:")
                print_ingest_details(result)
            print_ingest_verdict(results[0], gauges[mix])
            if compare:
                print(f"\n== compare, {mix} mix: the same bodies against agl store ==")
                print_comparison(comparison)

    if "load" in args.parts:
        print(f"\n== load: {args.load_connections} clients for {load_seconds:.0f} s, write queue "
              f"{args.queue_bytes / 2**20:.0f} MiB, Retry-After honoured ==")
        print_load(load_test(args.load_connections, load_seconds, args.queue_bytes, args.load_processes, args.batch,
                             sub("load"), workload.with_bodies(0)))

    if "crash" in args.parts:
        print(f"\n== crash: SIGKILL at 50% of {crash_spans:,} spans acknowledged, restart, resend the rest ==")
        targets: list[Target] = ["tracelearn", "agl"] if have_agl else ["tracelearn"]
        print_crash([crash_durability(t, crash_spans, args.clients, 0.5, args.batch,
                                      sub(f"crash-{t}"), args.agl, workload) for t in targets])
    print(f"\ngauge at the end, {mixes[0]} mix: decode + rows alone {decode_rows_rate(workload):,.0f} spans/CPU-s; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
