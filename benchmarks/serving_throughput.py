"""Throughput and latency of the embedded model server: 8 and 32 concurrent clients against the same
requests sent one at a time, in the same run.

The server is the real one (``GenerationEngine`` behind the FastAPI app under uvicorn, on a loopback
port) and the client is the real ``openai`` SDK, so the numbers include HTTP, JSON and chat-template
work, as an agent sees them. Every phase sends the same requests (same prompts, ``max_tokens``,
temperature and per-request seeds); seeded sampling does not depend on batch company, so every phase
generates the same tokens and the comparison is like for like. Tokens are counted from the
responses' ``usage``.

* sequential: the ``--requests`` requests one after another (every step decodes one row);
* C clients (for each C in ``--concurrency``, default 8 and 32): C clients in a closed loop, each
  sending its next request as soon as its previous one is answered (the engine decodes them
  together, up to ``--max-batch-size``, default 32).

Prints, per phase, tokens/s (median over ``--rounds``), p50 and p99 request latency (over all rounds),
the batch sizes the engine actually ran, and the ratio of each concurrent phase's throughput to the
sequential one. The model is the tiny random test model by default (fast); ``--model smollm2`` serves
SmolLM2-135M-Instruct from the model cache, a path serves that model.

    PYTHONPATH=tests .venv/bin/python benchmarks/serving_throughput.py [--model tiny|smollm2|PATH] [--requests 64]
        [--concurrency 8 32] [--max-tokens 32] [--rounds 3] [--max-batch-size 32]
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from openai import AsyncOpenAI

from tracelearn.models import FETCH_COMMAND, LoadedModel, default_model_path, load_model, resolve_model
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app

TINY_MODEL_HINT = ("the tiny random model is the test suite's (tests/support/tiny_model.py): put tests/ on the "
                   "path, PYTHONPATH=tests .venv/bin/python benchmarks/serving_throughput.py, or give --model "
                   "smollm2 or a model directory")
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 plus 30?",
    "Write one sentence about the sea.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "How many days are in a week?",
    "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into Spanish.",
    "What is the largest planet?",
    "Suggest a name for a cat.",
]


def load(model: str, scratch: Path) -> LoadedModel:
    if model == "tiny":
        try:
            from support.tiny_model import build_tiny_model
        except ModuleNotFoundError:
            sys.exit(TINY_MODEL_HINT)

        print("using the tiny random test model")
        return load_model(resolve_model(str(build_tiny_model(scratch / "tiny"))), device="cpu")
    if model == "smollm2" and not default_model_path().is_file():
        sys.exit(f"SmolLM2 is not in the model cache; fetch it with: {FETCH_COMMAND}")
    started = time.perf_counter()
    loaded = load_model(resolve_model(model))
    print(f"loaded {loaded.model_version} on {loaded.device} in {time.perf_counter() - started:.1f} s")
    return loaded


@dataclass
class PhaseResults:
    """What one phase measured over every round."""

    rates: list[float] = field(default_factory=list)  # tokens/s, one per round
    latencies: list[float] = field(default_factory=list)  # seconds, one per request


async def run_phase(
    client: AsyncOpenAI, model: str, requests: int, max_tokens: int, clients: int
) -> tuple[int, float, list[float]]:
    """Send ``requests`` requests from ``clients`` closed-loop clients; return (completion tokens, wall
    seconds, per-request latencies).
    """
    pending = list(range(requests))
    tokens = 0
    latencies: list[float] = []

    async def one(index: int) -> None:
        nonlocal tokens
        sent = time.perf_counter()
        response = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            max_tokens=max_tokens,
            temperature=0.7,
            seed=index,
        )
        latencies.append(time.perf_counter() - sent)
        assert response.usage is not None
        tokens += response.usage.completion_tokens

    async def client_loop() -> None:
        while pending:
            await one(pending.pop(0))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return tokens, time.perf_counter() - started, latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def measure(server: BackgroundServer, engine: GenerationEngine, args: argparse.Namespace) -> None:
    client = AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=600)
    model = engine.model_id
    await run_phase(client, model, 4, 8, clients=4)  # warm-up: first-call allocations, lazy imports
    phases = {1: "sequential", **{c: f"{c} clients" for c in args.concurrency}}
    results = {name: PhaseResults() for name in phases.values()}
    for round_index in range(args.rounds):
        for clients, name in phases.items():
            before = engine.stats().batch_sizes
            tokens, seconds, latencies = await run_phase(client, model, args.requests, args.max_tokens, clients)
            after = engine.stats().batch_sizes
            sizes = {size: count - before.get(size, 0) for size, count in sorted(after.items())}
            sizes = {size: count for size, count in sizes.items() if count}
            results[name].rates.append(tokens / seconds)
            results[name].latencies.extend(latencies)
            print(f"round {round_index + 1} {name:>11}: {tokens} tokens in {seconds:6.2f} s = "
                  f"{tokens / seconds:7.1f} tokens/s   (decoding steps by batch size: {sizes})")
    sequential = statistics.median(results["sequential"].rates)
    print(f"\nmodel {engine.model_version}, {args.requests} requests x {args.max_tokens} max tokens per phase, "
          f"max batch size {engine.max_batch_size}, {args.rounds} rounds")
    print(f"{'phase':>12} {'tokens/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'vs sequential':>14}")
    for name, result in results.items():
        rate = statistics.median(result.rates)
        p50, p99 = (1000 * percentile(result.latencies, share) for share in (0.5, 0.99))
        print(f"{name:>12} {rate:10.1f} {p50:9.1f} {p99:9.1f} {rate / sequential:13.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or a model path")
    parser.add_argument("--requests", type=int, default=64, help="requests per phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="concurrent clients to compare")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        engine = GenerationEngine(load(args.model, Path(scratch)), max_batch_size=args.max_batch_size)
        try:
            with BackgroundServer(create_app(engine)) as server:
                asyncio.run(measure(server, engine, args))
        finally:
            engine.close()


if __name__ == "__main__":
    main()
