"""The generation engine: one worker thread that decodes every in-flight request in one batch.

Requests are queued from any thread (the API's asyncio loop). The worker waits a short window for
company when idle, prefills the newcomers together, and then runs one batched forward pass per step
over all live rows with a key/value cache (continuous batching: requests that arrive while a batch
runs join it at the next step, finished ones leave it). Each row keeps its own sampling parameters,
seed, stop strings and token budget. Every sampled token is reported to its request's listener as
it is produced, so the API can stream.

The torch loop never runs on the asyncio thread; the API awaits ``stream`` / ``generate``, which
bridge the worker's callbacks into an ``asyncio.Queue``.

The batch itself (prefill from cached prefixes, decoding steps, a request's failure kept to that
request) is ``tracelearn.serving.decoding``'s; this module queues, admits and answers requests.

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
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tracelearn.models import LoadedModel
from tracelearn.serving.decoding import (
    Batch,
    BatchDecoder,
    EngineStats,
    FinishReason,
    Listener,
    PendingRequest,
    StepOutput,
    merge,
)
from tracelearn.serving.sampling import SamplingParams

__all__ = [
    "DEFAULT_PREFIX_CACHE_BYTES", "ContextLengthError", "EngineClosedError", "EngineStats", "FinishReason",
    "GenerationEngine", "GenerationResult", "Listener", "StepOutput",
]

logger = logging.getLogger(__name__)

# The prefix cache's default bound: ~11k tokens of SmolLM2-135M in float32 (46 KiB per token).
DEFAULT_PREFIX_CACHE_BYTES = 512 * 1024 * 1024


class ContextLengthError(ValueError):
    """A prompt plus its token budget does not fit in the model's context."""


class EngineClosedError(RuntimeError):
    """The engine was shut down before the request finished."""


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


class GenerationEngine:
    """Batched, streaming generation over one loaded model; thread-safe to submit to.

    ``max_batch_size`` bounds the rows decoded together; ``batch_window_s`` is how long an idle
    worker waits for more requests before starting a batch (a few milliseconds: long enough for a
    burst of concurrent requests to arrive together, short enough to be invisible in latency).
    ``prefix_cache_bytes``: the bound of the prefix cache (0: no cache), which keeps the key/value
    cache of prompts and finished sequences so a prompt that starts with one prefills only the rest.
    """

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8, batch_window_s: float = 0.005,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._loaded = loaded
        self._tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.stop_token_ids = _stop_token_ids(loaded)
        self._vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        # Each request with the function told when it joins the batch (``submit``'s ``on_admitted``).
        self._incoming: queue.Queue[tuple[PendingRequest, Callable[[], None] | None] | None] = queue.Queue()
        self._torch_threads: int | None = None  # what torch gives the worker thread, once it runs
        self._closed = threading.Event()
        # Held while checking for shutdown and queueing, so no request slips in after the last drain.
        self._submit_lock = threading.Lock()
        self._decoder = BatchDecoder(loaded, self.stop_token_ids, prefix_cache_bytes)  # the worker's alone
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
        return self._decoder.stats()

    @property
    def torch_threads(self) -> int | None:
        """torch's intra-op threads as the worker thread sees them (``torch.set_num_threads``;
        ``tracelearn serve --threads``); None until the worker has started."""
        return self._torch_threads

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

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams, listener: Listener,
               on_admitted: Callable[[], None] | None = None) -> threading.Event:
        """Queue a request; ``listener`` gets each ``StepOutput`` (or the exception that ended it) on the
        worker thread. Setting the returned event cancels the request at the next step. ``on_admitted``
        is called on the worker thread when the request leaves the queue for the batch (or is dropped
        there, cancelled); the API's ``AdmissionQueue`` counts queued requests with it.
        """
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        if not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < self._vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self._vocab_size}) for {self.model_id}")
        self.check_fits(len(prompt_token_ids), params.max_tokens)
        request = PendingRequest(list(prompt_token_ids), params, listener)
        with self._submit_lock:
            if self._closed.is_set():
                raise EngineClosedError("the generation engine is shut down")
            self._incoming.put((request, on_admitted))
        return request.cancelled

    async def stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, on_admitted: Callable[[], None] | None = None
    ) -> AsyncGenerator[StepOutput, None]:
        """Generate, yielding each token as it is produced. Closing the iterator early cancels the request.
        ``on_admitted``: as ``submit``'s."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()

        def deliver(item: StepOutput | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        cancel = self.submit(prompt_token_ids, params, deliver, on_admitted)
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

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       on_admitted: Callable[[], None] | None = None) -> GenerationResult:
        """Generate to the end and return everything at once (``on_admitted``: as ``submit``'s)."""
        steps = [step async for step in self.stream(prompt_token_ids, params, on_admitted)]
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
        batch: Batch | None = None
        self._torch_threads = torch.get_num_threads()
        with torch.inference_mode():
            while not self._closed.is_set():
                capacity = self.max_batch_size - (len(batch.rows) if batch else 0)
                arrivals = self._admit(capacity, wait=batch is None)
                try:
                    if arrivals:
                        joined = self._decoder.prefill(arrivals)
                        if joined is not None:
                            batch = joined if batch is None else merge(batch, joined)
                    if batch is not None:
                        batch = self._decoder.step(batch)
                except Exception as error:  # a fault of the engine itself: fails what it held, not the server
                    logger.exception("the generation worker failed; its requests fail, the engine goes on")
                    failed = [row.request for row in batch.rows] if batch else []
                    for request in {id(r): r for r in [*failed, *arrivals]}.values():
                        self._decoder.fail(request, error)
                    batch = None
        self._fail_remaining(batch)
        self._decoder.release()

    def _admit(self, capacity: int, wait: bool) -> list[PendingRequest]:
        """Take up to ``capacity`` queued requests. When idle, block for the first one and then give
        others ``batch_window_s`` to arrive, so a burst starts as one batch.
        """
        arrivals: list[PendingRequest] = []
        deadline: float | None = None
        while len(arrivals) < capacity:
            try:
                if wait and not arrivals:
                    queued = self._incoming.get()
                elif wait:
                    if deadline is None:
                        deadline = time.monotonic() + self.batch_window_s
                    queued = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    queued = self._incoming.get_nowait()
            except queue.Empty:
                break
            if queued is None:  # close() woke us up
                break
            request, on_admitted = queued
            if on_admitted is not None:
                _call_admitted(on_admitted)
            if not request.cancelled.is_set():
                arrivals.append(request)
        return arrivals

    def _fail_remaining(self, batch: Batch | None) -> None:
        error = EngineClosedError("the generation engine shut down before the request finished")
        for row in batch.rows if batch else []:
            self._decoder.fail(row.request, error)
        while True:
            try:
                queued = self._incoming.get_nowait()
            except queue.Empty:
                return
            if queued is not None:
                self._decoder.fail(queued[0], error)


def _call_admitted(on_admitted: Callable[[], None]) -> None:
    try:
        on_admitted()
    except Exception:  # a caller's bookkeeping: it must not stop the worker that decodes everyone's rows
        logger.exception("a request's on_admitted callback failed; the request is decoded anyway")


def _stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """End-of-turn tokens: the generation config's ``eos_token_id`` (one or several) and the tokenizer's."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    ids.discard(None)
    if not ids:
        raise ValueError(f"{loaded.model_id} defines no end-of-sequence token; generation could never stop")
    return frozenset(int(i) for i in ids)

