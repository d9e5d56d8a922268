"""The generation engine: one worker thread that decodes every in-flight request in one batch.

Requests are queued from any thread (the API's asyncio loop). The worker waits a short window for
company when idle, prefills the newcomers together, and then runs one batched forward pass per step
over all live rows with a key/value cache (continuous batching: requests that arrive while a batch
runs join it at the next step, finished ones leave it). Each row keeps its own sampling parameters,
seed, stop strings and token budget. Every sampled token is reported to its request's listener as
it is produced, so the API can stream.

The torch loop never runs on the asyncio thread; the API awaits ``stream`` / ``generate``, which
bridge the worker's callbacks into an ``asyncio.Queue``.

Per request the engine returns the prompt token ids it was given, the response token ids as sampled
(including the end-of-turn token when the model emits one, and the token that completed a stop
string, whose text is cut at the stop string as OpenAI and vLLM do), each token's logprob under the raw model
distribution (see ``tracelearn.serving.sampling``), the text and a finish reason: ``stop`` (end-of-turn
token or stop string) or ``length`` (``max_tokens`` or the context reached). ``tool_calls`` is decided
by the API, which parses the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from transformers import DynamicCache

from tracelearn.serving.batching import CachedPrefix, PaddedCache, PrefixCache, left_pad
from tracelearn.serving.model_store import LoadedModel
from tracelearn.serving.sampling import SamplingParams, TokenChoice, choose_token, make_generator, score_token
from tracelearn.serving.text_output import ResponseText

FinishReason = Literal["stop", "length"]


class ContextLengthError(ValueError):
    """A prompt plus its token budget does not fit in the model's context."""


class EngineClosedError(RuntimeError):
    """The engine was shut down before the request finished."""


@dataclass(frozen=True)
class StepOutput:
    """One generated token of one request, the text it made visible, and (on the last) why it ended."""

    token: TokenChoice
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A finished request: what a trainer needs to reuse the exact tokens."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[tuple[int, float], ...]]
    text: str
    finish_reason: FinishReason
    model_version: str


@dataclass
class EngineStats:
    """Counters of the worker, read by tests, benchmarks and operators. ``batch_sizes`` maps a batch
    size to how many decoding steps ran with that many rows.
    """

    requests_completed: int = 0
    tokens_generated: int = 0
    steps: int = 0
    max_batch_size: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    prefix_cache_hits: int = 0  # requests whose prefill started from a cached prompt prefix
    prefix_tokens_reused: int = 0  # prompt tokens those requests did not recompute


Listener = Callable[[StepOutput | BaseException], None]


@dataclass
class _Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    listener: Listener
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    """A request being decoded: its output so far and its private sampling state."""

    request: _Request
    response: ResponseText
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        """Position id of the token fed in the next forward pass (the last one sampled)."""
        return len(self.request.prompt_token_ids) + len(self.token_ids) - 1


@dataclass
class _Batch:
    rows: list[_Row]
    kv: PaddedCache
    next_logits: torch.Tensor  # [rows, vocab]: logits of each row's next token


class GenerationEngine:
    """Batched, streaming generation over one loaded model; thread-safe to submit to.

    ``max_batch_size`` bounds the rows decoded together; ``batch_window_s`` is how long an idle
    worker waits for more requests before starting a batch (a few milliseconds: long enough for a
    burst of concurrent requests to arrive together, short enough to be invisible in latency).
    ``prefix_cache``: prompt prefixes that requests share (an agent's system prompt and tool
    declarations, often most of the prompt) are computed once and their key/value cache reused
    (``tracelearn.serving.batching.PrefixCache``), so a prefill runs only on what follows them.
    """

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8, batch_window_s: float = 0.005,
                 prefix_cache: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.stop_token_ids = _stop_token_ids(loaded)
        pad = self._tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self.stop_token_ids))
        self._vocab_size = int(self._model.get_input_embeddings().num_embeddings)
        self._incoming: queue.Queue[_Request | None] = queue.Queue()
        self._closed = threading.Event()
        # Held while checking for shutdown and queueing, so no request slips in after the last drain.
        self._submit_lock = threading.Lock()
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._prefixes = PrefixCache() if prefix_cache else None  # touched by the worker thread only
        self._worker = threading.Thread(target=self._run, name="tracelearn-generation", daemon=True)
        self._worker.start()

    @property
    def model_id(self) -> str:
        return self._loaded.model_id

    @property
    def model_version(self) -> str:
        """Identity of the weights answering requests (``<model_id>@<sha256 prefix>``)."""
        return self._loaded.model_version

    @property
    def context_length(self) -> int:
        return self._loaded.context_length

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def stats(self) -> EngineStats:
        """A snapshot of the worker's counters."""
        with self._stats_lock:
            return replace(self._stats, batch_sizes=dict(self._stats.batch_sizes))

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The token budget for a prompt of ``prompt_tokens``: ``max_tokens``, or all the context left
        when None. Raises ``ContextLengthError`` when it does not fit.
        """
        room = self.context_length - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"messages resulted in {prompt_tokens} tokens, leaving no room for a completion."
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        return max_tokens

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams, listener: Listener) -> threading.Event:
        """Queue a request; ``listener`` gets each ``StepOutput`` (or the exception that ended it) on the
        worker thread. Setting the returned event cancels the request at the next step.
        """
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        if not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < self._vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self._vocab_size}) for {self.model_id}")
        self.check_fits(len(prompt_token_ids), params.max_tokens)
        request = _Request(list(prompt_token_ids), params, listener)
        with self._submit_lock:
            if self._closed.is_set():
                raise EngineClosedError("the generation engine is shut down")
            self._incoming.put(request)
        return request.cancelled

    async def stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[StepOutput, None]:
        """Generate, yielding each token as it is produced. Closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

        def deliver(item: StepOutput | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        cancel = self.submit(prompt_token_ids, params, deliver)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancel.set()

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        """Generate to the end and return everything at once."""
        steps = [step async for step in self.stream(prompt_token_ids, params)]
        finish_reason = steps[-1].finish_reason
        assert finish_reason is not None  # stream() ends on the step that carries it
        return GenerationResult(
            prompt_token_ids=list(prompt_token_ids),
            token_ids=[s.token.token_id for s in steps],
            logprobs=[s.token.logprob for s in steps],
            top_logprobs=[s.token.top_logprobs for s in steps],
            text="".join(s.text for s in steps),
            finish_reason=finish_reason,
            model_version=self.model_version,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued or running get ``EngineClosedError``."""
        with self._submit_lock:
            self._closed.set()
            self._incoming.put(None)
        self._worker.join(timeout)

    # --- worker thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        batch: _Batch | None = None
        with torch.inference_mode():
            while not self._closed.is_set():
                capacity = self.max_batch_size - (len(batch.rows) if batch else 0)
                arrivals = self._admit(capacity, wait=batch is None)
                try:
                    if arrivals:
                        joined = self._prefill(arrivals)
                        batch = joined if batch is None else _merge(batch, joined)
                    if batch is not None:
                        batch = self._step(batch)
                except Exception as error:  # a failed forward pass fails its requests, not the server
                    failed = [row.request for row in batch.rows] if batch else []
                    for request in {id(r): r for r in [*failed, *arrivals]}.values():
                        request.listener(error)
                    batch = None
        self._fail_remaining(batch)

    def _admit(self, capacity: int, wait: bool) -> list[_Request]:
        """Take up to ``capacity`` queued requests. When idle, block for the first one and then give
        others ``batch_window_s`` to arrive, so a burst starts as one batch.
        """
        arrivals: list[_Request] = []
        deadline: float | None = None
        while len(arrivals) < capacity:
            try:
                if wait and not arrivals:
                    request = self._incoming.get()
                elif wait:
                    if deadline is None:
                        deadline = time.monotonic() + self.batch_window_s
                    request = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    request = self._incoming.get_nowait()
            except queue.Empty:
                break
            if request is None:  # close() woke us up
                break
            if not request.cancelled.is_set():
                arrivals.append(request)
        return arrivals

    def _prefill(self, requests: list[_Request]) -> _Batch:
        """Run the newcomers' prompts: grouped by the cached prefix they start with (each group's
        prefill runs only on what follows it), the rest in full; the groups are then one batch."""
        groups: dict[tuple[int, ...] | None, tuple[CachedPrefix | None, list[_Request]]] = {}
        for request in requests:
            prefix = self._prefix_for(request.prompt_token_ids)
            key = prefix.token_ids if prefix is not None else None
            groups.setdefault(key, (prefix, []))[1].append(request)
        batches = [self._prefill_group(prefix, members) for prefix, members in groups.values()]
        batch = batches[0]
        for other in batches[1:]:
            batch = _merge(batch, other)
        return batch

    def _prefix_for(self, prompt: list[int]) -> CachedPrefix | None:
        """The cached prefix ``prompt`` starts with; one is computed (and cached) when the prompt
        shares enough with a recent one. None without a prefix cache or a shared prefix."""
        if self._prefixes is None:
            return None
        found = self._prefixes.lookup(prompt)
        if found is not None:
            return found
        wanted = self._prefixes.candidate(prompt)
        if wanted is None:
            return None
        kv = PaddedCache(DynamicCache(), torch.ones((1, len(wanted)), dtype=torch.long, device=self._loaded.device))
        ids = torch.tensor([wanted], dtype=torch.long, device=self._loaded.device)
        self._forward(ids, kv, torch.arange(len(wanted), device=self._loaded.device).unsqueeze(0))
        computed = CachedPrefix(wanted, tuple((k, v) for k, v, *_ in kv.cache))
        self._prefixes.store(computed)
        return computed

    def _prefill_group(self, prefix: CachedPrefix | None, requests: list[_Request]) -> _Batch:
        if prefix is None:
            input_ids, mask, positions = left_pad([r.prompt_token_ids for r in requests], self._pad_id,
                                                  self._loaded.device)
            kv = PaddedCache(DynamicCache(), mask)
        else:
            shared = len(prefix.token_ids)
            suffixes = [r.prompt_token_ids[shared:] for r in requests]
            input_ids, suffix_mask, suffix_positions = left_pad(suffixes, self._pad_id, self._loaded.device)
            kv = prefix.expanded(len(requests), suffix_mask)
            positions = suffix_positions + shared
            with self._stats_lock:
                self._stats.prefix_cache_hits += len(requests)
                self._stats.prefix_tokens_reused += shared * len(requests)
        logits = self._forward(input_ids, kv, positions)
        rows = [
            _Row(r, ResponseText(self._tokenizer, r.params.stop), make_generator(r.params.seed)) for r in requests
        ]
        return _Batch(rows, kv, logits)

    def _forward(self, input_ids: torch.Tensor, kv: PaddedCache, positions: torch.Tensor) -> torch.Tensor:
        output = self._model(
            input_ids=input_ids,
            attention_mask=kv.mask,
            position_ids=positions,
            past_key_values=kv.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token for every row, report it, drop finished rows, run the next forward pass."""
        logits = batch.next_logits.float().cpu()
        logprobs = torch.log_softmax(logits, dim=-1)
        self._record_step(len(batch.rows))
        keep: list[int] = []
        for index, row in enumerate(batch.rows):
            if row.request.cancelled.is_set():
                continue
            params = row.request.params
            token_id = choose_token(logits[index], params, row.generator)
            if self._emit(row, score_token(logprobs[index], token_id, params.top_logprobs)) is None:
                keep.append(index)
        if not keep:
            return None
        rows = [batch.rows[i] for i in keep]
        kv = batch.kv if len(keep) == len(batch.rows) else batch.kv.select(keep)
        device = self._loaded.device
        input_ids = torch.tensor([[row.token_ids[-1]] for row in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.next_position] for row in rows], dtype=torch.long, device=device)
        kv.extend_mask()
        return _Batch(rows, kv, self._forward(input_ids, kv, positions))

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
        row.request.listener(StepOutput(choice, text, finish))
        return finish

    def _record_step(self, rows: int) -> None:
        with self._stats_lock:
            stats = self._stats
            stats.steps += 1
            stats.max_batch_size = max(stats.max_batch_size, rows)
            stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1

    def _fail_remaining(self, batch: _Batch | None) -> None:
        error = EngineClosedError("the generation engine shut down before the request finished")
        for row in batch.rows if batch else []:
            row.request.listener(error)
        while True:
            try:
                request = self._incoming.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.listener(error)


def _merge(running: _Batch, joined: _Batch) -> _Batch:
    return _Batch(
        [*running.rows, *joined.rows],
        running.kv.concat(joined.kv),
        torch.cat([running.next_logits, joined.next_logits], dim=0),
    )


def _stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """End-of-turn tokens: the generation config's ``eos_token_id`` (one or several) and the tokenizer's."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    ids.discard(None)
    if not ids:
        raise ValueError(f"{loaded.model_id} defines no end-of-sequence token; generation could never stop")
    return frozenset(int(i) for i in ids)

