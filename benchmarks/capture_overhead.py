"""Added CPU per LLM call with tracelearn capture on, against the same instrumentation with a no-op exporter.

Target (issue): capture adds under 0.3 ms of agent CPU per LLM call.

One small agent (the real ``openai`` client, sync chat completions with a tool, a conversation that
grows over a few calls per rollout, ``rollout()`` around each task and ``emit_reward`` at its end)
runs against a local OpenAI-compatible server in a separate process, so the server's CPU is not
counted. The server is ``tests/support/scripted_llm_server.py`` when it is there (it returns token
ids and logprobs when asked, like vLLM), else a fixed-answer server built into this file.

Each configuration runs in its own subprocess (instrumentation cannot be fully undone in-process),
in rotating order over ``--repeats`` repetitions; the medians are compared:

* ``none``: no OpenTelemetry SDK, no instrumentation (the client's own cost, for context);
* ``noop``: Traceloop's ``OpenAIInstrumentor`` + SDK ``TracerProvider`` + ``DurableBatchSpanProcessor``
  in front of an exporter that returns SUCCESS and does nothing;
* ``parquet``: tracelearn capture as our configurator installs it: ``RolloutContextSpanProcessor`` +
  ``DurableBatchSpanProcessor`` in front of ``ParquetSpanExporter`` (every rollout end appends its
  spans to the spool and fsyncs; Parquet files are written at the roll, here at shutdown);
* ``parquet+token_ids``: the same plus ``TokenIdsInstrumentor`` (token ids and logprobs asked for,
  read back and recorded), when that module imports.

Measured per configuration: ``time.process_time()`` (all threads of the agent process, the exporter's
worker included) over ``--calls`` calls plus the final ``force_flush`` and ``shutdown`` (for ``parquet``
the roll of every measured span into Parquet, which a long run does once per
``TRACELEARN_ROLL_SECONDS``), after a warm-up. Nothing is
asserted: the script prints the added CPU per call of ``parquet`` over ``noop`` (median of the
per-repeat differences) against the target.

    .venv/bin/python benchmarks/capture_overhead.py [--calls 400] [--repeats 5] [--calls-per-rollout 4]
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import re
import socketserver
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
SCRIPTED_SERVER = REPOSITORY / "tests" / "support" / "scripted_llm_server.py"
TARGET_MS = 0.3
CONFIGS = ("none", "noop", "parquet", "parquet+token_ids")
MODEL = "bench-model"
SYSTEM_PROMPT = (
    "You are a careful math assistant. Read the user's question, call the calculator tool for every "
    "computation, check the tool's result against a rough estimate, and answer with the number and one "
    "short sentence of explanation. Never guess a number you could compute. " * 4
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression and return the number.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "for example 3 * (4 + 5)"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a unit conversion or a constant up.",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
    },
]


# --- The fallback server (used when the scripted test server is not there) -------------------------


def _builtin_completion(body: dict[str, Any]) -> dict[str, Any]:
    answer = "The result is 395: 17 times 23 is 391, plus 4 gives 395, which matches the estimate of 400."
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": answer},
        "finish_reason": "stop",
    }
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{time.time_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", MODEL),
        "choices": [choice],
        "usage": {"prompt_tokens": 400, "completion_tokens": 24, "total_tokens": 424},
    }
    if body.get("return_token_ids"):  # vLLM's extension, as TokenIdsInstrumentor asks for it
        completion["prompt_token_ids"] = list(range(1000, 1400))
        choice["token_ids"] = list(range(2000, 2024))
    if body.get("logprobs"):
        choice["logprobs"] = {
            "content": [{"token": f"t{i}", "logprob": -0.1 * i, "bytes": None, "top_logprobs": []} for i in range(24)]
        }
    return completion


class _BuiltinHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive request (wall time only, but it slows runs).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        data = json.dumps(_builtin_completion(body)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve_builtin() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BuiltinHandler)
    server.daemon_threads = True
    print(f"builtin server on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


def serve_scripted() -> None:
    """Run the scripted test server's own ``main`` (``--port 0``), with TCP_NODELAY on its sockets."""
    spec = importlib.util.spec_from_file_location("scripted_llm_server", SCRIPTED_SERVER)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {SCRIPTED_SERVER}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # Same ~40 ms Nagle/delayed-ACK stall as described on ``_BuiltinHandler``; every handler class
    # derives from StreamRequestHandler, so this reaches the scripted server's handler too.
    socketserver.StreamRequestHandler.disable_nagle_algorithm = True
    sys.argv = [str(SCRIPTED_SERVER), "--port", "0"]
    module.main()


@contextlib.contextmanager
def llm_server(kind: str) -> Iterator[tuple[str, str]]:
    """Start the server in its own process; yields (base URL, which server)."""
    if kind == "auto":
        kind = "scripted" if SCRIPTED_SERVER.is_file() else "builtin"
    command = [sys.executable, str(Path(__file__).resolve()), f"--serve-{kind}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPOSITORY)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://\S+", line)
        if match is None:
            raise SystemExit(f"the {kind} server did not start (said {line!r}); try --server builtin")
        yield match.group().rstrip("/"), kind
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- The agent, run in a worker subprocess per configuration ----------------------------------------


def install(config: str, data: Path) -> Any:
    """Install the configuration's tracing; returns the tracer provider (``None`` for ``none``)."""
    if config == "none":
        return None
    from opentelemetry import trace
    from opentelemetry.instrumentation.openai import OpenAIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from tracelearn.instrumentation.span_processors import DurableBatchSpanProcessor, RolloutContextSpanProcessor

    class NoOp(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "bench-agent"}))
    if config == "noop":
        provider.add_span_processor(DurableBatchSpanProcessor(NoOp()))
    else:
        from tracelearn.collector.settings import CaptureSettings
        from tracelearn.collector.span_exporter import ParquetSpanExporter

        exporter = ParquetSpanExporter(CaptureSettings.from_env({"TRACELEARN_DATA": str(data)}))
        provider.add_span_processor(RolloutContextSpanProcessor())
        provider.add_span_processor(DurableBatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    OpenAIInstrumentor().instrument(tracer_provider=provider)
    if config == "parquet+token_ids":
        from tracelearn.instrumentation.token_ids import TokenIdsInstrumentor

        TokenIdsInstrumentor().instrument(tracer_provider=provider, mode="on")
    return provider


def run_rollout(client: Any, index: int, calls: int) -> int:
    """One task: ``calls`` chat completions over a growing conversation, then a reward."""
    from tracelearn.instrumentation.emit import emit_reward
    from tracelearn.instrumentation.rollout_context import rollout

    a, b, c = 11 + index % 37, 17 + index % 29, 3 + index % 7
    question = f"A shop sells {a} boxes with {b} pens each and {c} loose pens. What is {a} times {b} plus {c}?"
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]
    with rollout(task_id=f"task-{index % 16}", agent="bench_agent"):
        for step in range(calls):
            response = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0.7)
            message = response.choices[0].message
            if message.tool_calls:
                messages.append(message.model_dump(exclude_none=True))
                for call in message.tool_calls:
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": str(a * b + c)})
            else:
                messages.append({"role": "assistant", "content": message.content or ""})
                messages.append({"role": "user", "content": f"Check step {step + 1} once more and say it in words."})
        emit_reward(1.0)
    return calls


def worker(config: str, base_url: str, calls: int, per_rollout: int, warmup: int) -> None:
    """Run the agent under ``config`` and print one JSON line with the measurements."""
    import openai

    with tempfile.TemporaryDirectory(prefix="tracelearn-bench-") as tmp:
        provider = install(config, Path(tmp))
        client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)

        def run(count: int, first: int) -> int:
            done, index = 0, first
            while done < count:
                done += run_rollout(client, index, min(per_rollout, count - done))
                index += 1
            if provider is not None:
                provider.force_flush()
            return index

        next_index = run(warmup, 0)  # imports, connections, the first spool append: not measured
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        run(calls, next_index)
        if provider is not None:
            provider.shutdown()  # the roll into Parquet, once for all measured calls
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        files = len(list(Path(tmp).rglob("*.parquet")))
    print(json.dumps({"config": config, "calls": calls, "cpu_s": cpu, "wall_s": wall, "files": files}))


# --- The driver ------------------------------------------------------------------------------------


def available_configs() -> list[str]:
    try:
        __import__("tracelearn.instrumentation.token_ids")
    except Exception as exc:  # being written concurrently: benchmark what exists
        print(f"(parquet+token_ids skipped: tracelearn.instrumentation.token_ids does not import: {exc})")
        return [c for c in CONFIGS if c != "parquet+token_ids"]
    return list(CONFIGS)


def run_worker(config: str, base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        config,
        "--base-url",
        base_url,
        "--calls",
        str(args.calls),
        "--calls-per-rollout",
        str(args.calls_per_rollout),
        "--warmup",
        str(args.warmup),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPOSITORY, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {config} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="measured LLM calls per configuration run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per configuration, in rotating order")
    parser.add_argument("--calls-per-rollout", type=int, default=4, help="LLM calls per rollout (one spool append)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured calls before measuring")
    parser.add_argument("--server", choices=("auto", "scripted", "builtin"), default="auto")
    parser.add_argument(
        "--configs", nargs="+", choices=CONFIGS, help="configurations to run (default: all that import; noop always)"
    )
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--serve-builtin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-scripted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_builtin:
        serve_builtin()
        return
    if args.serve_scripted:
        serve_scripted()
        return
    if args.worker:
        worker(args.worker, args.base_url, args.calls, args.calls_per_rollout, args.warmup)
        return

    configs = available_configs()
    if args.configs:
        configs = [c for c in configs if c in args.configs or c == "noop"]
    per_call: dict[str, list[float]] = {c: [] for c in configs}
    wall_per_call: dict[str, list[float]] = {c: [] for c in configs}
    with llm_server(args.server) as (base_url, kind):
        print(
            f"server: {kind} ({base_url}), separate process; {args.calls} calls per run, "
            f"{args.calls_per_rollout} per rollout, {args.repeats} repeats"
        )
        for repeat in range(args.repeats):
            order = configs[repeat % len(configs) :] + configs[: repeat % len(configs)]
            for config in order:
                result = run_worker(config, base_url, args)
                per_call[config].append(result["cpu_s"] * 1000 / result["calls"])
                wall_per_call[config].append(result["wall_s"] * 1000 / result["calls"])
                print(
                    f"  repeat {repeat + 1}/{args.repeats} {config:<18} "
                    f"{per_call[config][-1]:6.3f} ms CPU/call, {wall_per_call[config][-1]:6.3f} ms wall/call, "
                    f"{result['files']} files"
                )

    medians = {c: statistics.median(v) for c, v in per_call.items()}
    print()
    print(f"{'configuration':<20}{'CPU ms/call':>12}{'wall ms/call':>14}{'vs noop':>10}")
    for config in configs:
        added = medians[config] - medians["noop"]
        print(f"{config:<20}{medians[config]:>12.3f}{statistics.median(wall_per_call[config]):>14.3f}{added:>+10.3f}")
    spread = max(per_call["noop"]) - min(per_call["noop"])
    print(f"(noop spread over repeats: {spread:.3f} ms CPU/call; other load on the machine widens it)")
    headline = None
    for config in ("parquet+token_ids", "parquet"):
        if config not in medians:
            continue
        # Paired per repeat (the runs of one repeat are back to back, under the same load), then the
        # median; the difference of the quietest runs (minimums) is printed next to it.
        paired = statistics.median(a - b for a, b in zip(per_call[config], per_call["noop"], strict=True))
        quiet = min(per_call[config]) - min(per_call["noop"])
        ratio = medians[config] / medians["noop"]
        print(
            f"added CPU per call, {config} over noop: {paired:.3f} ms "
            f"(median of per-repeat differences; quietest runs {quiet:.3f} ms; ratio {ratio:.3f})"
        )
        headline = paired
    if headline is not None:
        verdict = "PASS" if headline < TARGET_MS else "ABOVE TARGET"
        print(f"{verdict}: parquet target < {TARGET_MS} ms added CPU per LLM call ({args.repeats} repeats)")


if __name__ == "__main__":
    main()
