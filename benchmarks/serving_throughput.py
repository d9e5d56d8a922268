"""Throughput of the embedded model server: one request at a time against 8 concurrent ones, same run.

The server is the real one (``GenerationEngine`` behind the FastAPI app under uvicorn, on a loopback
port) and the client is the real ``openai`` SDK, so the numbers include HTTP, JSON and chat-template
work, as an agent sees them. Both phases send the same requests (same prompts, ``max_tokens``,
temperature and per-request seeds); seeded sampling does not depend on batch company, so both
phases generate the same tokens and the comparison is like for like. Tokens are counted from the
responses' ``usage``.

* sequential: the requests one after another (concurrency 1, so every step decodes one row);
* concurrent: all of them at once (the engine decodes them together, up to ``--max-batch-size``).

Prints tokens/s of each phase (median over ``--rounds``), the batch sizes the engine actually ran,
and the speedup ratio ``concurrent / sequential``. The model is SmolLM2-135M-Instruct when it is in
the model cache, else the tiny random test model (``--model tiny`` forces it; a path serves that).

    .venv/bin/python benchmarks/serving_throughput.py [--model smollm2|tiny|PATH] [--requests 8]
        [--max-tokens 64] [--rounds 3] [--max-batch-size 8]
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI

from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.model_store import LoadedModel, default_model_path, load_model, resolve_model
from tracelearn.serving.openai_api import create_app

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
    if model == "tiny" or (model == "smollm2" and not default_model_path().is_file()):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from support.tiny_model import build_tiny_model

        print("using the tiny random test model" + (" (SmolLM2 is not cached)" if model == "smollm2" else ""))
        return load_model(resolve_model(str(build_tiny_model(scratch / "tiny"))), device="cpu")
    started = time.perf_counter()
    loaded = load_model(resolve_model(model))
    print(f"loaded {loaded.model_version} on {loaded.device} in {time.perf_counter() - started:.1f} s")
    return loaded


async def run_phase(
    client: AsyncOpenAI, model: str, requests: int, max_tokens: int, concurrent: bool
) -> tuple[int, float]:
    """Send the requests; return (completion tokens, wall seconds)."""

    async def one(index: int) -> int:
        response = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            max_tokens=max_tokens,
            temperature=0.7,
            seed=index,
        )
        assert response.usage is not None
        return response.usage.completion_tokens

    started = time.perf_counter()
    if concurrent:
        counts = await asyncio.gather(*(one(i) for i in range(requests)))
    else:
        counts = [await one(i) for i in range(requests)]
    return sum(counts), time.perf_counter() - started


async def measure(server: BackgroundServer, engine: GenerationEngine, args: argparse.Namespace) -> None:
    client = AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=600)
    model = engine.model_id
    await run_phase(client, model, 2, 8, concurrent=True)  # warm-up: first-call allocations, lazy imports
    rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for round_index in range(args.rounds):
        for phase in ("sequential", "concurrent"):
            before = engine.stats().batch_sizes
            tokens, seconds = await run_phase(client, model, args.requests, args.max_tokens, phase == "concurrent")
            after = engine.stats().batch_sizes
            sizes = {size: count - before.get(size, 0) for size, count in sorted(after.items())}
            sizes = {size: count for size, count in sizes.items() if count}
            rates[phase].append(tokens / seconds)
            print(f"round {round_index + 1} {phase:>10}: {tokens} tokens in {seconds:6.2f} s = "
                  f"{tokens / seconds:7.1f} tokens/s   (decoding steps by batch size: {sizes})")
    sequential, concurrent = statistics.median(rates["sequential"]), statistics.median(rates["concurrent"])
    print(f"\nmodel {engine.model_version}, {args.requests} requests x {args.max_tokens} max tokens, "
          f"max batch size {engine.max_batch_size}")
    print(f"sequential (1 at a time): {sequential:7.1f} tokens/s")
    print(f"concurrent ({args.requests} at once):  {concurrent:7.1f} tokens/s")
    print(f"batching speedup: {concurrent / sequential:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8)
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
