"""A multi-turn tool agent against the embedded model server, with and without the prefix cache, side
by side in one run: throughput, the ratio, and where a round's time goes.

The agent is the bundled calc agent's loop, scripted so every conversation has the same number of
turns: its system prompt and calculator tool (optionally after ``--shots`` worked exchanges, the
variant that makes SmolLM2 call the tool: the agent's ``--few-shot``), a task question (default: the
two-digit products of ``examples/calc/products.jsonl``), then per turn the model's reply and
either the calculator's result (the agent's own ``run_tool``) or, when the model called no tool, a
short follow-up. Each turn's prompt is therefore the previous prompt, the reply and something new,
re-rendered by the server's chat template from the messages, as a real agent sends it. ``--samples``
conversations per task run at once (a GRPO group), ``--concurrency`` conversations are in flight.

Both phases send the same requests with the same per-request seeds through the real ``openai`` SDK
to the real server (``GenerationEngine`` behind the FastAPI app under uvicorn); the only difference
is ``prefix_cache_bytes`` (0 for "without"). Phases alternate over ``--rounds`` (each round starts
from an empty cache) and the medians are compared. Per phase it prints turns and tokens per second,
how many prompt tokens were computed and how many came from the cache, and the time split: prefill,
decoding forward passes, the rest of decoding (sampling, detokenizing, streaming to listeners), and
the time the worker was idle (HTTP, JSON, the chat template and tokenization, the client and its
tool), with the chat template and tokenization timed separately by re-rendering the phase's requests.

    .venv/bin/python benchmarks/multi_turn_prefix_cache.py [--model smollm2|PATH] [--tasks 2]
        [--samples 4] [--turns 3] [--concurrency 8] [--max-tokens 32] [--shots 2] [--rounds 2] [--threads N]
"""

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from openai import AsyncOpenAI

from tracelearn.models import FETCH_COMMAND, LoadedModel, default_model_path, load_model, resolve_model
from tracelearn.serving.chat_format import ChatPromptBuilder
from tracelearn.serving.engine import DEFAULT_PREFIX_CACHE_BYTES, EngineStats, GenerationEngine
from tracelearn.serving.http_server import BackgroundServer
from tracelearn.serving.openai_api import create_app

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "calc"))
import agent as calc_agent  # noqa: E402  (the bundled example is a script directory, not a package)

FOLLOW_UP = "Use the calculator tool to check, then reply with the number only."


def load(model: str) -> LoadedModel:
    if model == "smollm2" and not default_model_path().is_file():
        sys.exit(f"SmolLM2 is not in the model cache; fetch it with: {FETCH_COMMAND}")
    started = time.perf_counter()
    loaded = load_model(resolve_model(model))
    print(f"loaded {loaded.model_version} on {loaded.device} in {time.perf_counter() - started:.1f} s")
    return loaded


def first_messages(question: str, shots: int) -> list[dict[str, Any]]:
    """The calc agent's first prompt with ``--few-shot shots``: its system prompt, worked exchanges, the question."""
    examples = [message for number in range(shots) for message in calc_agent.worked_exchange(number)]
    return [{"role": "system", "content": calc_agent.SYSTEM_PROMPT}, *examples, {"role": "user", "content": question}]


@dataclass
class Phase:
    """What one phase of one round measured."""

    seconds: float
    turns: int
    completion_tokens: int
    tool_calls: int
    stats: EngineStats
    token_ids: dict[tuple[int, int], list[int]]  # (conversation, turn) -> the reply's token ids
    requests: list[tuple[list[dict[str, Any]], bool]] = field(default_factory=list)  # messages, with tools

    @property
    def turns_per_second(self) -> float:
        return self.turns / self.seconds


async def converse(client: AsyncOpenAI, model: str, index: int, question: str, args: argparse.Namespace,
                   phase: Phase) -> None:
    messages = first_messages(question, args.shots)
    for turn in range(args.turns):
        phase.requests.append(([dict(m) for m in messages], True))
        response = await client.chat.completions.create(
            model=model, messages=messages, tools=[calc_agent.CALCULATOR_TOOL],  # type: ignore[arg-type]
            max_tokens=args.max_tokens, temperature=args.temperature, seed=1000 * index + turn,
            extra_body={"return_token_ids": True},
        )
        message = response.choices[0].message
        phase.token_ids[(index, turn)] = list(response.choices[0].model_extra["token_ids"])  # type: ignore[index]
        assert response.usage is not None
        phase.completion_tokens += response.usage.completion_tokens
        phase.turns += 1
        reply = calc_agent.Turn.of(message)
        messages.append(reply.message())
        for call in reply.tool_calls:
            phase.tool_calls += 1
            result = calc_agent.run_tool(call["function"]["name"], call["function"]["arguments"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if not reply.tool_calls:
            messages.append({"role": "user", "content": FOLLOW_UP})


async def run_phase(loaded: LoadedModel, prefix_cache_bytes: int, questions: list[str],
                    args: argparse.Namespace) -> Phase:
    engine = GenerationEngine(loaded, max_batch_size=args.max_batch_size, prefix_cache_bytes=prefix_cache_bytes)
    try:
        with BackgroundServer(create_app(engine)) as server:
            client = AsyncOpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=1800)
            phase = Phase(0.0, 0, 0, 0, EngineStats(), {})
            pending = list(enumerate(questions))

            async def conversation_loop() -> None:
                while pending:
                    index, question = pending.pop(0)
                    await converse(client, engine.model_id, index, question, args, phase)

            started = time.perf_counter()
            await asyncio.gather(*(conversation_loop() for _ in range(args.concurrency)))
            phase.seconds = time.perf_counter() - started
            phase.stats = engine.stats()
            return phase
    finally:
        engine.close()


def template_seconds(loaded: LoadedModel, phase: Phase) -> float:
    """The server's chat template and tokenization for every request of ``phase``, timed by redoing them."""
    builder = ChatPromptBuilder(loaded.tokenizer)
    tools = [calc_agent.CALCULATOR_TOOL]
    started = time.perf_counter()
    for messages, with_tools in phase.requests:
        builder.prompt_token_ids(messages, tools if with_tools else None)
    return time.perf_counter() - started


def report(name: str, phase: Phase, tokenizing: float) -> None:
    stats = phase.stats
    decode_rest = stats.decode_seconds - stats.decode_forward_seconds
    idle = phase.seconds - stats.prefill_seconds - stats.decode_seconds

    def share(seconds: float) -> str:
        return f"{seconds:7.1f} s ({100 * seconds / phase.seconds:4.1f}%)"

    print(f"  {name}: {phase.turns} turns in {phase.seconds:.1f} s = {phase.turns_per_second:.2f} turns/s, "
          f"{phase.completion_tokens / phase.seconds:.1f} completion tokens/s; {phase.tool_calls} tool calls")
    print(f"    prompt tokens {stats.prompt_tokens}, of which from the cache {stats.prefix_tokens_reused} "
          f"({100 * stats.prefix_tokens_reused / max(1, stats.prompt_tokens):.0f}%, {stats.prefix_cache_hits} hits, "
          f"{stats.prefix_cache_bytes / 2**20:.0f} MiB cached); tokens prefilled {stats.prefill_tokens} "
          f"(a group's shared prompt once)")
    print(f"    prefill {share(stats.prefill_seconds)} | decoding forward {share(stats.decode_forward_seconds)} | "
          f"decoding rest {share(decode_rest)} | worker idle {share(idle)}, of which chat template + tokenizing "
          f"{tokenizing:.1f} s")


async def measure(loaded: LoadedModel, args: argparse.Namespace) -> None:
    tasks = calc_agent.read_tasks(args.tasks_file, args.tasks, args.samples)
    questions = [task.question for task in tasks]
    await run_phase(loaded, 0, questions[:2], argparse.Namespace(**{**vars(args), "turns": 1}))  # warm-up
    phases: dict[str, list[Phase]] = {"without": [], "with": []}
    for round_index in range(args.rounds):
        for name, cache_bytes in (("without", 0), ("with", args.prefix_cache_mb << 20)):
            phase = await run_phase(loaded, cache_bytes, questions, args)
            phases[name].append(phase)
            print(f"round {round_index + 1}, {name} the prefix cache:")
            report(name, phase, template_seconds(loaded, phase))
    without, with_cache = (statistics.median(p.turns_per_second for p in phases[n]) for n in ("without", "with"))
    same = [a.token_ids == b.token_ids for a, b in zip(phases["without"], phases["with"], strict=True)]
    print(f"\nmodel {loaded.model_version} on {loaded.device} ({torch.get_num_threads()} torch threads); "
          f"{len(questions)} conversations ({args.tasks} tasks x "
          f"{args.samples} samples) x {args.turns} turns, {args.concurrency} in flight, max_tokens {args.max_tokens}, "
          f"{args.shots} worked exchanges, max batch size {args.max_batch_size}, {args.rounds} rounds")
    print(f"turns/s (median): without the prefix cache {without:.3f}, with it {with_cache:.3f}: "
          f"{with_cache / without:.2f}x")
    print(f"identical replies with and without the cache in {sum(same)} of {len(same)} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a model path (the tiny test "
                        "model's 512-token context is too short for this agent's prompts)")
    parser.add_argument("--tasks-file", type=Path, default=ROOT / "examples" / "calc" / "products.jsonl",
                        help="the calc agent's tasks (default: the two-digit products, where the tool decides)")
    parser.add_argument("--tasks", type=int, default=2, help="how many tasks of the file")
    parser.add_argument("--samples", type=int, default=4, help="conversations per task (a GRPO group)")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation")
    parser.add_argument("--concurrency", type=int, default=8, help="conversations in flight")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--shots", type=int, default=2, choices=range(len(calc_agent.WORKED_EXAMPLES) + 1),
                        help="worked tool exchanges before the question (the agent's --few-shot)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_PREFIX_CACHE_BYTES >> 20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 holds up far better on a shared, loaded machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    asyncio.run(measure(load(args.model), args))


if __name__ == "__main__":
    main()
