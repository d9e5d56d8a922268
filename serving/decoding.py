"""The torch side of the generation worker: ``BatchDecoder`` prefills newcomers, decodes one step of
every row, drops the finished ones, and keeps a request's failure to that request.

Rows are left-padded into one batch (``tracelearn.serving.batching``) and start from the longest
prefix of their prompt that the prefix cache holds (``tracelearn.serving.prefix_cache``); every
prefilled prompt and every finished sequence (prompt and reply) is offered to that cache, so the next
turn of a conversation, or another sample of the same task, prefills only what is new.

Isolation: whatever is done for one row (sampling, detokenizing, stop strings, its listener) fails
only that row; a forward pass that fails for several rows is run again for each row alone, from the
cache as it was before, so only a row that fails alone fails (a prefill likewise, request by request).

Used by ``tracelearn.serving.engine`` on its worker thread only; nothing here is thread-safe except
``stats``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from tracelearn.models import LoadedModel
from tracelearn.serving.batching import PaddedCache, left_pad
from tracelearn.serving.prefix_cache import PrefixCache
from tracelearn.serving.sampling import SamplingParams, TokenChoice, make_generator, sample_token
from tracelearn.serving.text_output import ResponseText

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StepOutput:
    """One generated token of one request, the text it made visible, and (on the last) why it ended."""

    token: TokenChoice
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class EngineStats:
    """Counters of the worker, read by tests, benchmarks and operators. ``batch_sizes`` maps a batch
    size to how many decoding steps ran with that many rows.
    """

    requests_completed: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    steps: int = 0
    max_batch_size: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # of every prefilled request
    prefill_tokens: int = 0  # tokens prefill forward passes actually ran (shared prefixes included, padding not)
    prefix_cache_hits: int = 0  # requests whose prefill started from a cached prompt prefix
    prefix_tokens_reused: int = 0  # prompt tokens those requests did not recompute
    prefix_cache_bytes: int = 0
    prefill_seconds: float = 0.0  # worker time prefilling newcomers (shared prefixes and cache copies included)
    decode_seconds: float = 0.0  # worker time in decoding steps: sampling, reporting, forward passes
    decode_forward_seconds: float = 0.0  # the forward passes of those steps


Listener = Callable[[StepOutput | BaseException], None]


@dataclass
class PendingRequest:
    """A submitted request: its prompt, how to decode it, who hears each token, and its cancel flag."""

    prompt_token_ids: list[int]
    params: SamplingParams
    listener: Listener
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    """A request being decoded: its output so far and its private sampling state."""

    request: PendingRequest
    response: ResponseText
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        """Position id of the token fed in the next forward pass (the last one sampled)."""
        return len(self.request.prompt_token_ids) + len(self.token_ids) - 1


@dataclass
class Batch:
    """The rows decoded together, their key/value cache, and each row's next-token logits."""

    rows: list[_Row]
    kv: PaddedCache
    next_logits: torch.Tensor  # [rows, vocab]: logits of each row's next token


class BatchDecoder:
    """Prefill and decoding steps of one model's batch, with the prefix cache and the worker's counters.

    ``prefix_cache_bytes``: the prefix cache's bound (0: no cache). ``stop_token_ids``: the model's
    end-of-turn tokens.
    """

    def __init__(self, loaded: LoadedModel, stop_token_ids: frozenset[int], prefix_cache_bytes: int) -> None:
        self._loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self.stop_token_ids = stop_token_ids
        pad = self._tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(stop_token_ids))
        self._prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40); a model
        # written against the old interface (remote code) still gets its cache.
        parameters = inspect.signature(self._model.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()  # the only state read from other threads

    def stats(self) -> EngineStats:
        with self._stats_lock:
            return replace(self._stats, batch_sizes=dict(self._stats.batch_sizes))

    def release(self) -> None:
        """Drop the prefix cache (the engine has stopped; a retired engine may outlive its use)."""
        self._prefixes = None
        with self._stats_lock:
            self._stats.prefix_cache_bytes = 0

    def prefill(self, requests: list[PendingRequest]) -> Batch | None:
        """Run the newcomers' prompts, each from the longest prefix the cache holds; the new rows, or
        None when every one of them failed. Only a request whose prompt fails alone fails."""
        started = time.perf_counter()
        try:
            return self._prefill_isolated(requests)
        finally:
            self._add_time("prefill_seconds", started)

    def _prefill_isolated(self, requests: list[PendingRequest]) -> Batch | None:
        try:
            if self._prefixes is not None and len(requests) > 1:
                self._cache_shared_prefixes([r.prompt_token_ids for r in requests])
            return self._prefill_rows(requests)
        except Exception as error:
            if len(requests) == 1:
                self.fail(requests[0], error)
                return None
        alone = [batch for request in requests if (batch := self._prefill_isolated([request])) is not None]
        return functools.reduce(merge, alone) if alone else None

    def _prefill_rows(self, requests: list[PendingRequest]) -> Batch:
        prompts = [r.prompt_token_ids for r in requests]
        kv, logits, reused = self._run_prompts(prompts)
        rows = [
            _Row(r, ResponseText(self._tokenizer, r.params.stop), make_generator(r.params.seed)) for r in requests
        ]
        with self._stats_lock:
            self._stats.prompt_tokens += sum(len(p) for p in prompts)
            self._stats.prefix_cache_hits += sum(1 for n in reused if n)
            self._stats.prefix_tokens_reused += sum(reused)
        for index, prompt in enumerate(prompts):  # a later request may start with this prompt
            self._remember(prompt, kv, index)
        return Batch(rows, kv, logits)

    def _run_prompts(self, prompts: list[list[int]]) -> tuple[PaddedCache, torch.Tensor, list[int]]:
        """One forward pass over ``prompts``, each from its longest cached prefix: the batch's cache,
        each row's next-token logits, and how many tokens of each prompt came from the cache."""
        cache = self._prefixes
        hits = [cache.longest_prefix(p, len(p) - 1) if cache is not None else None for p in prompts]
        reused = [hit.length if hit is not None else 0 for hit in hits]
        device = self._loaded.device
        input_ids, suffix_mask, positions = left_pad([p[n:] for p, n in zip(prompts, reused, strict=True)],
                                                     self._pad_id, device)
        positions = positions + torch.tensor(reused, dtype=torch.long, device=device).unsqueeze(1)
        kv = PaddedCache.starting_from([hit.kv if hit is not None else None for hit in hits], suffix_mask)
        logits = self._forward(input_ids, kv, positions)
        with self._stats_lock:
            self._stats.prefill_tokens += sum(len(p) for p in prompts) - sum(reused)
        return kv, logits, reused

    def _cache_shared_prefixes(self, prompts: list[list[int]]) -> None:
        """Prompts that arrive together and share a prefix the cache lacks (a GRPO group's samples,
        tasks under one system prompt): the shared part runs once, alone, and is cached, so that each
        prompt's prefill starts after it instead of every row computing it again."""
        assert self._prefixes is not None
        for index, prompt in enumerate(prompts):
            shared = min(max(_common_prefix_length(prompt, other) for other in prompts[:index]) if index else 0,
                         len(prompt) - 1)
            if shared - self._prefixes.matched_length(prompt) >= self._prefixes.min_tokens:
                kv, _, _ = self._run_prompts([prompt[:shared]])
                self._remember(prompt[:shared], kv, 0)

    def _remember(self, tokens: list[int], kv: PaddedCache, row: int) -> None:
        """Offer ``row``'s key/value cache, which holds exactly ``tokens``, to the prefix cache."""
        if self._prefixes is None:
            return
        try:
            self._prefixes.insert(tokens, kv.key_values_of_row(row))
        except Exception:  # the cache only saves work: a request never fails for it
            logger.exception("a sequence of %d tokens could not be added to the prefix cache", len(tokens))
        with self._stats_lock:
            self._stats.prefix_cache_bytes = self._prefixes.nbytes

    def _forward(self, input_ids: torch.Tensor, kv: PaddedCache, positions: torch.Tensor) -> torch.Tensor:
        output = self._model(
            input_ids=input_ids,
            attention_mask=kv.mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_keyword: kv.cache},
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    def step(self, batch: Batch) -> Batch | None:
        """Sample one token for every row, report it, drop finished rows, run the next forward pass."""
        started = time.perf_counter()
        logits = batch.next_logits.float().cpu()
        self._record_step(len(batch.rows))
        keep: list[int] = []
        for index, row in enumerate(batch.rows):
            if row.request.cancelled.is_set():
                continue
            params = row.request.params
            try:
                finish = self._emit(row, sample_token(logits[index], params, row.generator))
            except Exception as error:  # this row's own failure ends this row only
                self.fail(row.request, error)
                continue
            if finish is None:
                keep.append(index)
            else:  # the next turn of this conversation will start with all of it
                self._remember([*row.request.prompt_token_ids, *row.token_ids[:-1]], batch.kv, index)
        advanced = self._advance(batch, keep) if keep else None
        self._add_time("decode_seconds", started)
        return advanced

    def _advance(self, batch: Batch, keep: list[int]) -> Batch | None:
        """The forward pass that feeds each kept row its newest token. Should it fail, each row runs
        alone from the cache as it was, and only a row that fails alone fails."""
        rows = [batch.rows[i] for i in keep]
        kv = batch.kv if len(keep) == len(batch.rows) else batch.kv.select(keep)
        device = self._loaded.device
        input_ids = torch.tensor([[row.token_ids[-1]] for row in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.next_position] for row in rows], dtype=torch.long, device=device)
        kv.extend_mask()
        before = kv.layer_tensors()
        started = time.perf_counter()
        try:
            return Batch(rows, kv, self._forward(input_ids, kv, positions))
        except Exception as error:
            if len(rows) == 1:
                self.fail(rows[0].request, error)
                return None
        finally:
            self._add_time("decode_forward_seconds", started)
        survivors = []
        for index, row in enumerate(rows):
            alone = PaddedCache.from_tensors(before, kv.mask).select([index])
            try:
                logits = self._forward(input_ids[index : index + 1], alone, positions[index : index + 1])
            except Exception as error:
                self.fail(row.request, error)
                continue
            survivors.append(Batch([row], alone, logits))
        return functools.reduce(merge, survivors) if survivors else None

    def _emit(self, row: _Row, choice: TokenChoice) -> FinishReason | None:
        """Append the token to its row, tell the listener, and return the finish reason if it ended."""
        row.token_ids.append(choice.token_id)
        finish: FinishReason | None = None
        if choice.token_id in self.stop_token_ids or choice.token_id in row.request.params.stop_token_ids:
            finish, text = "stop", row.response.finish()
        else:
            text, stopped = row.response.push(choice.token_id)
            if stopped:
                finish = "stop"
            elif len(row.token_ids) >= row.request.params.max_tokens:
                finish, text = "length", text + row.response.finish()
        with self._stats_lock:  # before the listener: a caller woken by the last token sees final counts
            self._stats.tokens_generated += 1
            self._stats.requests_completed += finish is not None
        _tell(row.request, StepOutput(choice, text, finish))
        return finish

    def fail(self, request: PendingRequest, error: BaseException) -> None:
        """End ``request`` with ``error`` (counted)."""
        with self._stats_lock:
            self._stats.requests_failed += 1
        _tell(request, error)

    def _add_time(self, counter: str, started: float) -> None:
        with self._stats_lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + time.perf_counter() - started)

    def _record_step(self, rows: int) -> None:
        with self._stats_lock:
            stats = self._stats
            stats.steps += 1
            stats.max_batch_size = max(stats.max_batch_size, rows)
            stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1


def merge(running: Batch, joined: Batch) -> Batch:
    """One batch of ``running``'s rows and then ``joined``'s."""
    return Batch(
        [*running.rows, *joined.rows],
        running.kv.concat(joined.kv),
        torch.cat([running.next_logits, joined.next_logits], dim=0),
    )


def _tell(request: PendingRequest, item: StepOutput | BaseException) -> None:
    """Hand ``item`` to the request's listener; a listener that raises has lost its reader, so its
    request is cancelled (and nothing else is disturbed)."""
    try:
        request.listener(item)
    except Exception:
        logger.exception("a request's listener failed; the request is cancelled")
        request.cancelled.set()


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length
