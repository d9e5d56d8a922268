"""The generation engine: batching that changes nothing a request sees, joins and leaves, cancellation."""

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from tracelearn.models import LoadedModel, load_model, resolve_model
from tracelearn.serving.batching import PaddedCache, left_pad
from tracelearn.serving.engine import ContextLengthError, GenerationEngine, GenerationResult
from tracelearn.serving.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def prompt(engine: GenerationEngine, text: str) -> list[int]:
    encoded = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def test_left_pad_aligns_last_tokens_and_counts_positions_over_real_tokens() -> None:
    ids, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def _cache(rows: int, columns: int, fill: float) -> DynamicCache:
    tensor = torch.full((rows, 2, columns, 4), fill)
    return DynamicCache(ddp_cache_data=[(tensor, tensor.clone()), (tensor.clone(), tensor.clone())])


def test_padded_cache_concat_pads_left_and_select_trims_unused_columns() -> None:
    short = PaddedCache(_cache(1, 2, 1.0), torch.tensor([[1, 1]]))
    long = PaddedCache(_cache(1, 4, 2.0), torch.tensor([[0, 1, 1, 1]]))
    both = short.concat(long)
    assert both.mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    keys = next(iter(both.cache))[0]
    assert keys.shape == (2, 2, 4, 4)
    assert keys[0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    only_short = both.select([0])
    assert only_short.mask.tolist() == [[1, 1]]
    assert next(iter(only_short.cache))[0][0, 0, :, 0].tolist() == [1.0, 1.0]


def test_batched_generation_equals_one_at_a_time(engine: GenerationEngine) -> None:
    prompts = [prompt(engine, "tell me " * k + "a story") for k in range(1, 6)]
    sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=11)

    async def alone(params: SamplingParams) -> list[GenerationResult]:
        return [await engine.generate(p, params) for p in prompts]

    async def together(params: SamplingParams) -> list[GenerationResult]:
        return list(await asyncio.gather(*(engine.generate(p, params) for p in prompts)))

    for params in (GREEDY, sampled):  # a seeded row draws the same tokens whoever shares its batch
        single, batched = asyncio.run(alone(params)), asyncio.run(together(params))
        assert [r.token_ids for r in batched] == [r.token_ids for r in single]
        assert [r.text for r in batched] == [r.text for r in single]
        for a, b in zip(single, batched, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_a_request_joins_a_running_batch_and_leaves_it_early(engine: GenerationEngine) -> None:
    long_prompt, short_prompt = prompt(engine, "a long answer please " * 3), prompt(engine, "hi")
    long_params = SamplingParams(max_tokens=60, temperature=0)
    short_params = SamplingParams(max_tokens=8, temperature=0)

    async def alone() -> tuple[GenerationResult, GenerationResult]:
        return await engine.generate(long_prompt, long_params), await engine.generate(short_prompt, short_params)

    async def overlapping() -> tuple[GenerationResult, GenerationResult]:
        long_run = asyncio.create_task(engine.generate(long_prompt, long_params))
        started = engine.stats().tokens_generated
        while engine.stats().tokens_generated < started + 10:  # the long request is mid-flight
            await asyncio.sleep(0.001)
        short = await engine.generate(short_prompt, short_params)
        return await long_run, short

    expected = asyncio.run(alone())
    before = engine.stats().batch_sizes.get(2, 0)
    results = asyncio.run(overlapping())
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert [r.text for r in results] == [r.text for r in expected]
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert engine.stats().batch_sizes.get(2, 0) > before


def test_stop_token_ids_end_the_response_and_stay_in_the_ids(engine: GenerationEngine) -> None:
    ids = asyncio.run(engine.generate(prompt(engine, "count"), GREEDY)).token_ids
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(ids[3],))
    result = asyncio.run(engine.generate(prompt(engine, "count"), params))
    assert result.token_ids == ids[: ids.index(ids[3]) + 1]
    assert result.finish_reason == "stop"
    assert result.text == engine.tokenizer.decode(result.token_ids[:-1], skip_special_tokens=True)


def test_closing_a_stream_cancels_its_request(engine: GenerationEngine) -> None:
    long_prompt = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 3 plus 4?"}],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"]
    params = SamplingParams(max_tokens=400, temperature=0)
    full_length = len(asyncio.run(engine.generate(long_prompt, params)).token_ids)
    assert full_length > 100  # greedy runs long enough for an early exit to show

    async def read_two_then_leave() -> None:
        async with contextlib.aclosing(engine.stream(long_prompt, params)) as stream:
            read = 0
            async for _ in stream:
                read += 1
                if read == 2:
                    break

    before = engine.stats().tokens_generated
    asyncio.run(read_two_then_leave())
    time.sleep(0.2)
    settled = engine.stats().tokens_generated
    time.sleep(0.2)
    assert engine.stats().tokens_generated == settled, "the engine kept generating for a closed stream"
    assert settled - before < full_length // 2
    assert asyncio.run(engine.generate(prompt(engine, "still there?"), GREEDY)).token_ids


def test_requests_that_cannot_fit_the_context_are_refused(engine: GenerationEngine) -> None:
    assert engine.check_fits(10, None) == engine.context_length - 10
    with pytest.raises(ContextLengthError, match="maximum context length"):
        engine.check_fits(10, engine.context_length)
    with pytest.raises(ContextLengthError):
        engine.submit([1] * engine.context_length, GREEDY, lambda _: None)


def test_a_shared_prompt_prefix_is_computed_once_and_changes_nothing_a_request_sees(tiny_model: LoadedModel) -> None:
    system = "You are a careful calculator. Use the tool, then reply with the number only. " * 2
    prompts = [prompt_with_system(tiny_model, system, f"What is {n} plus {n + 3}?") for n in range(6)]
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=5)

    def run(prefix_cache: bool, together: bool) -> tuple[list[GenerationResult], int, int]:
        engine = GenerationEngine(tiny_model, max_batch_size=8, batch_window_s=0.02,
                                  prefix_cache_bytes=(64 << 20) if prefix_cache else 0)
        try:
            async def generate(params: SamplingParams) -> list[GenerationResult]:
                if together:
                    return list(await asyncio.gather(*(engine.generate(p, params) for p in prompts)))
                return [await engine.generate(p, params) for p in prompts]

            results = []
            for params in (GREEDY, sampled):
                results += asyncio.run(generate(params))
            stats = engine.stats()
            return results, stats.prefix_cache_hits, stats.prefix_tokens_reused
        finally:
            engine.close()

    plain, no_hits, _ = run(prefix_cache=False, together=True)
    assert no_hits == 0
    for together in (True, False):  # a burst, and requests one after another
        cached, hits, reused = run(prefix_cache=True, together=together)
        assert [r.token_ids for r in cached] == [r.token_ids for r in plain]
        assert [r.prompt_token_ids for r in cached] == [r.prompt_token_ids for r in plain]
        for a, b in zip(plain, cached, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
        # Every request but the very first reuses the shared part of the prompt.
        assert hits >= len(prompts) * 2 - 1
        assert reused >= hits * 40


def prompt_with_system(loaded: LoadedModel, system: str, text: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    encoded = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)
    return list(encoded["input_ids"])


TOOL_RESULT = "<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_the_next_turn_of_a_conversation_reuses_the_last_and_gets_the_same_tokens(tiny_model: LoadedModel) -> None:
    """An agent's next prompt is its last prompt, the reply and a tool result: with the prefix cache it
    prefills only the tool result, and every token and logprob is the uncached path's."""
    tool_result = list(tiny_model.tokenizer.encode(TOOL_RESULT, add_special_tokens=False))
    first_prompts = [prompt_with_system(tiny_model, "You are a calculator. " * 3, f"What is {n} times 34?")
                     for n in range(4)]

    def conversations(prefix_cache_bytes: int) -> tuple[list[list[GenerationResult]], int]:
        engine = GenerationEngine(tiny_model, max_batch_size=8, batch_window_s=0.02,
                                  prefix_cache_bytes=prefix_cache_bytes)

        async def converse(prompt: list[int], params: SamplingParams) -> list[GenerationResult]:
            turns = []
            for _ in range(3):
                turns.append(await engine.generate(prompt, params))
                prompt = [*prompt, *turns[-1].token_ids, *tool_result]
            return turns

        async def all_of_them() -> list[list[GenerationResult]]:
            seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=3)
            greedy = SamplingParams(max_tokens=12, temperature=0)
            return list(await asyncio.gather(*(converse(p, params) for p in first_prompts
                                               for params in (greedy, seeded))))

        try:
            return asyncio.run(all_of_them()), engine.stats().prefix_tokens_reused
        finally:
            engine.close()

    plain, none_reused = conversations(0)
    cached, reused = conversations(64 << 20)
    assert none_reused == 0
    for plain_turns, cached_turns in zip(plain, cached, strict=True):
        assert [t.token_ids for t in cached_turns] == [t.token_ids for t in plain_turns]
        assert [t.prompt_token_ids for t in cached_turns] == [t.prompt_token_ids for t in plain_turns]
        for a, b in zip(plain_turns, cached_turns, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
    # Every later turn reused at least the whole previous prompt and all but the last token of the reply.
    later_turns = [turns[k] for turns in cached for k in (1, 2)]
    assert reused >= sum(len(t.prompt_token_ids) - len(tool_result) - 1 for t in later_turns)


def test_a_failing_listener_ends_only_its_own_request(engine: GenerationEngine) -> None:
    ours, theirs = prompt(engine, "a long answer please " * 3), prompt(engine, "hi")
    params = SamplingParams(max_tokens=40, temperature=0)
    expected = asyncio.run(engine.generate(ours, params))
    failed_before = engine.stats().requests_failed

    def broken(_: object) -> None:
        raise RuntimeError("this client's callback is broken")

    async def scenario() -> tuple[GenerationResult, bool]:
        running = asyncio.create_task(engine.generate(ours, params))
        started = engine.stats().tokens_generated
        while engine.stats().tokens_generated < started + 5:  # ours is mid-flight
            await asyncio.sleep(0.001)
        cancelled = engine.submit(theirs, params, broken)
        result = await running
        return result, cancelled.is_set()

    result, theirs_cancelled = asyncio.run(scenario())
    assert result.token_ids == expected.token_ids and result.finish_reason == expected.finish_reason
    assert theirs_cancelled
    assert engine.stats().requests_failed == failed_before


def test_a_forward_pass_that_fails_for_one_row_fails_that_row_only(tiny_model_dir: Path) -> None:
    loaded = load_model(resolve_model(str(tiny_model_dir)), device="cpu")
    poison: list[int] = []  # the model fails any forward pass whose input holds this token

    def fail_on_poison(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if poison and bool((args[0] == poison[0]).any()):
            raise RuntimeError(f"the model failed on token {poison[0]}")

    loaded.model.get_input_embeddings().register_forward_pre_hook(fail_on_poison)
    engine = GenerationEngine(loaded, max_batch_size=8, batch_window_s=0.05)
    params = SamplingParams(max_tokens=30, temperature=0)
    healthy, other = prompt(engine, "hello there"), prompt(engine, "the robot answers a tool")
    try:
        expected = asyncio.run(engine.generate(healthy, params))
        others = asyncio.run(engine.generate(other, params)).token_ids
        clean = set(healthy) | set(expected.token_ids) | set(other)
        # The other request's reply reaches a token the healthy one never sees: its decoding step fails.
        decode_poison = next(t for i, t in enumerate(others[:-1]) if t not in clean and t not in others[:i])
        # A prompt that holds such a token fails in its prefill.
        prefill_poison = next(t for t in range(10, 700) if t not in clean | set(others))
        poisoned_prompt = [*other[:-3], prefill_poison, *other[-3:]]

        async def together(second: list[int]) -> tuple[GenerationResult, BaseException | GenerationResult]:
            results = await asyncio.gather(engine.generate(healthy, params), engine.generate(second, params),
                                           return_exceptions=True)
            assert isinstance(results[0], GenerationResult), results[0]
            return results[0], results[1]

        for token, second in ((decode_poison, other), (prefill_poison, poisoned_prompt)):
            poison[:] = [token]
            survivor, failure = asyncio.run(together(second))
            assert survivor.token_ids == expected.token_ids
            assert isinstance(failure, RuntimeError) and f"failed on token {token}" in str(failure)
        assert engine.stats().max_batch_size >= 2  # they did share a batch
    finally:
        engine.close()
