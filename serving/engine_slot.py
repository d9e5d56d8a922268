"""The engine a server answers with, replaceable while it serves: ``EngineSlot``.

A request takes a lease on the current engine for its whole life (planning, generation, the last
streamed byte). ``swap`` replaces the current engine atomically: requests that start afterwards get
the new one, requests already holding a lease finish on the old one, and the old engine is closed by
the slot once its last lease is released (it drains; nothing in flight is cut off). The slot owns
every engine it retires: retiring closes it. It also keeps the swap history an operator sees on
``/health``: how many swaps, when, and why the latest attempt failed, if it did.

Generic over where engines come from; ``tracelearn.serving.alias_follower`` swaps in new registry
versions through it.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from types import TracebackType

from tracelearn.serving.engine import GenerationEngine


@dataclass(frozen=True)
class SlotStatus:
    """What ``/health`` reports about the served engine and its swaps (times are Unix seconds)."""

    model_version: str
    following: str | None
    swaps: int
    last_swap_at: float | None
    last_swap_error: str | None
    last_swap_error_at: float | None
    draining: int  # retired engines still finishing requests


class EngineLease:
    """One request's hold on an engine; ``release`` (idempotent) lets a retired engine close."""

    def __init__(self, slot: EngineSlot, engine: GenerationEngine) -> None:
        self.engine = engine
        # A finalizer runs at most once: explicitly on release, or when the lease is garbage collected
        # (a streaming body that is never iterated because the client left before the first byte).
        self._finalizer = weakref.finalize(self, slot._release, engine)
        self._finalizer.atexit = False

    def release(self) -> None:
        self._finalizer()

    def __enter__(self) -> EngineLease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


class EngineSlot:
    """Holds the current engine; thread-safe (leases come from the asyncio loop, swaps from a watcher).

    ``following`` names what the slot tracks (``calc-policy@production``), for ``/health``.
    """

    def __init__(self, engine: GenerationEngine, following: str | None = None) -> None:
        self.following = following
        self._lock = threading.Lock()
        self._current = engine
        self._leases: dict[GenerationEngine, int] = {}
        self._retired: set[GenerationEngine] = set()
        self._swaps = 0
        self._last_swap_at: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._closed = False

    @property
    def current(self) -> GenerationEngine:
        return self._current

    def lease(self) -> EngineLease:
        """A lease on the current engine; release it when the request's response is complete."""
        with self._lock:
            engine = self._current
            self._leases[engine] = self._leases.get(engine, 0) + 1
        return EngineLease(self, engine)

    def swap(self, engine: GenerationEngine) -> GenerationEngine:
        """Make ``engine`` current; return the previous one, which closes once its requests finish."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine slot is closed; nothing can be swapped into it")
            previous, self._current = self._current, engine
            self._swaps += 1
            self._last_swap_at = time.time()
            self._last_error = self._last_error_at = None
            idle = self._leases.get(previous, 0) == 0
            if not idle:
                self._retired.add(previous)
        if idle:
            _close_in_background(previous)
        return previous

    def record_swap_failure(self, message: str) -> None:
        """Remember why the latest swap did not happen (shown on ``/health`` until a swap succeeds)."""
        with self._lock:
            self._last_error, self._last_error_at = message, time.time()

    def status(self) -> SlotStatus:
        with self._lock:
            return SlotStatus(
                model_version=self._current.model_version,
                following=self.following,
                swaps=self._swaps,
                last_swap_at=self._last_swap_at,
                last_swap_error=self._last_error,
                last_swap_error_at=self._last_error_at,
                draining=len(self._retired),
            )

    def close(self) -> None:
        """Close the current engine and every retired one (requests still running get ``EngineClosedError``)."""
        with self._lock:
            self._closed = True
            engines = [self._current, *self._retired]
            self._retired.clear()
        for engine in engines:
            engine.close()

    def _release(self, engine: GenerationEngine) -> None:
        with self._lock:
            remaining = self._leases[engine] - 1
            if remaining:
                self._leases[engine] = remaining
                return
            del self._leases[engine]
            drained = engine in self._retired
            self._retired.discard(engine)
        if drained:
            _close_in_background(engine)


def _close_in_background(engine: GenerationEngine) -> None:
    # close() joins the worker thread; the last lease is often released on the asyncio loop, which
    # must not block on it.
    threading.Thread(target=engine.close, name="tracelearn-engine-close", daemon=True).start()
