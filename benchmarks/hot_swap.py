"""Hot swap under load: how long from an alias move to the first answer from the new version, and how
many requests fail meanwhile (target: none).

Everything is real: a ``FilesystemRegistry`` in a temporary directory with two versions of
``bench-policy``, an ``AliasFollower`` polling ``registry:bench-policy@production`` every
``--watch-interval`` seconds, the uvicorn server, and ``--clients`` ``openai`` clients in a closed loop
(every other one streaming). After ``--warm-s`` seconds of load, version 2 is promoted; the load goes
on for ``--after-s`` seconds after the first answer from version 2.

Versions: by default two tiny random test models (different seeds). With ``--model smollm2``,
version 1 is SmolLM2-135M-Instruct's GGUF file from the model cache and version 2 a LoRA adapter on it
(random, non-zero weights: what a trained adapter looks like to the server), merged at load.

Prints: the time from the promotion to the swap (poll wait + verify + load + warm-up) and to the first
answer from version 2, requests answered by each version, failed requests, and p50/p99 latency before
and after the promotion.

    PYTHONPATH=tests .venv/bin/python benchmarks/hot_swap.py [--model tiny|smollm2] [--clients 8] [--watch-interval 2]

``--model tiny`` builds the test suite's tiny model, so it needs ``tests/`` on the path (``PYTHONPATH=tests``).
"""

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from openai import AsyncOpenAI

from tracelearn.models import FETCH_COMMAND, default_model_path, load_model, registry_model_version, resolve_model
from tracelearn.registry import Registry, open_registry
from tracelearn.serving.alias_follower import AliasFollower
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app

NAME = "bench-policy"
TINY_MODEL_HINT = ("the tiny random model is the test suite's (tests/support/tiny_model.py): put tests/ on the "
                   "path, PYTHONPATH=tests .venv/bin/python benchmarks/hot_swap.py, or give --model smollm2")
QUESTIONS = ["What is 12 plus 30?", "Name three primary colors.", "Why is the sky blue?", "What do bees make?"]


@dataclass(frozen=True)
class Answer:
    sent: float  # monotonic seconds
    done: float
    version: str | None  # None: the request failed
    error: str = ""


def publish_versions(registry: Registry, model: str, scratch: Path) -> None:
    """Versions 1 and 2 of ``bench-policy``; production names version 1."""
    if model == "tiny":
        try:
            from support.tiny_model import build_tiny_model
        except ModuleNotFoundError:
            sys.exit(TINY_MODEL_HINT)

        for seed in (1, 2):
            registry.publish("checkpoint", NAME, build_tiny_model(scratch / f"tiny-{seed}", seed=seed))
    else:
        if not default_model_path().is_file():
            sys.exit(f"SmolLM2 is not in the model cache; fetch it with: {FETCH_COMMAND}")
        registry.publish("checkpoint", NAME, default_model_path())
        registry.publish("checkpoint", NAME, smollm2_lora(scratch / "lora"))
    registry.promote(NAME, 1, "production")


def smollm2_lora(destination: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_model(resolve_model("smollm2"), device="cpu").model
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(destination)
    settings_path = destination / "adapter_config.json"
    settings = json.loads(settings_path.read_text())
    settings["base_model_name_or_path"] = "smollm2"
    settings_path.write_text(json.dumps(settings))
    return destination


async def client_loop(client: AsyncOpenAI, model: str, index: int, stop: asyncio.Event, answers: list[Answer],
                      max_tokens: int) -> None:
    count = 0
    while not stop.is_set():
        messages: list[dict[str, str]] = [{"role": "user", "content": QUESTIONS[(index + count) % len(QUESTIONS)]}]
        sent = time.monotonic()
        try:
            if index % 2:
                versions = {chunk.system_fingerprint async for chunk in await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, seed=count, stream=True)}  # type: ignore[arg-type]
                if len(versions) != 1:
                    raise RuntimeError(f"one streamed response came from versions {versions}")
                version = versions.pop()
            else:
                reply = await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, seed=count)  # type: ignore[arg-type]
                version = reply.system_fingerprint
            answers.append(Answer(sent, time.monotonic(), version))
        except Exception as error:
            answers.append(Answer(sent, time.monotonic(), None, f"{type(error).__name__}: {error}"))
        count += 1


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {1000 * statistics.median(ordered):7.1f} ms, p99 {1000 * p99:7.1f} ms"


async def run_load(follower: AliasFollower, server: BackgroundServer, registry: Registry,
                   args: argparse.Namespace) -> None:
    client = AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=600)
    old, new = (registry_model_version(registry.version(NAME, n)) for n in (1, 2))
    answers: list[Answer] = []
    stop = asyncio.Event()
    loops = [asyncio.create_task(client_loop(client, "served", i, stop, answers, args.max_tokens))
             for i in range(args.clients)]
    await asyncio.sleep(args.warm_s)
    promoted_wall, promoted = time.time(), time.monotonic()
    registry.promote(NAME, 2, "production")
    deadline = promoted + args.timeout_s
    while not any(a.version == new for a in answers) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    first_new = min((a.done for a in answers if a.version == new), default=None)
    if first_new is not None:
        await asyncio.sleep(args.after_s)
    stop.set()
    await asyncio.gather(*loops)

    status = follower.slot.status()
    failed = [a for a in answers if a.version is None]
    print(f"\n{args.clients} clients (half streaming), {len(answers)} requests, max_tokens {args.max_tokens}, "
          f"watch interval {args.watch_interval:g} s")
    print(f"versions: {old} -> {new}")
    if status.last_swap_at is not None:
        print(f"alias move -> swap (poll wait + verify + load + warm-up): {status.last_swap_at - promoted_wall:6.2f} s")
    if first_new is None:
        print(f"NO ANSWER FROM THE NEW VERSION within {args.timeout_s:g} s; last_swap_error: {status.last_swap_error}")
    else:
        print(f"alias move -> first answer from the new version:          {first_new - promoted:6.2f} s")
    by_old, by_new = sum(a.version == old for a in answers), sum(a.version == new for a in answers)
    print(f"answered by old: {by_old}, by new: {by_new}, other: {len(answers) - by_old - by_new - len(failed)}")
    # Steady state before the move: the second half of the warm-up window (the first requests pay
    # connection set-up and first-call costs).
    steady = [a.done - a.sent for a in answers if promoted - args.warm_s / 2 <= a.sent and a.done < promoted]
    print(f"latency before the move: {percentiles(steady)}")
    print(f"latency after the move:  {percentiles([a.done - a.sent for a in answers if a.sent >= promoted])}")
    print(f"failed requests: {len(failed)}  ({'PASS' if not failed and first_new else 'FAIL'}: target 0)")
    for answer in failed[:5]:
        print(f"  {answer.error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--watch-interval", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--warm-s", type=float, default=3.0, help="seconds of load before the promotion")
    parser.add_argument("--after-s", type=float, default=3.0, help="seconds of load after the first new answer")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tracelearn").setLevel(logging.INFO)  # the follower's swap log lines
    with tempfile.TemporaryDirectory() as scratch:
        registry = open_registry(Path(scratch) / "registry")
        publish_versions(registry, args.model, Path(scratch))
        follower = AliasFollower(
            f"registry:{NAME}@production", registry=registry, interval_s=args.watch_interval, device="cpu",
            make_engine=lambda loaded: GenerationEngine(loaded, max_batch_size=args.max_batch_size),
        )
        try:
            with BackgroundServer(create_app(follower.slot, "served")) as server:
                follower.start()
                asyncio.run(run_load(follower, server, registry, args))
        finally:
            follower.close()


if __name__ == "__main__":
    main()
