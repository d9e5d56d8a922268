"""Following a registry alias while serving: ``AliasFollower``.

It serves the version an alias names through an ``EngineSlot`` and polls the alias; when it moves,
the new version is resolved (``tracelearn.models.registry_model_source``, checksums verified), loaded
and warmed up on a background thread and then swapped in atomically (requests in flight finish on
the old engine, which drains and closes). A version that fails to resolve, verify, load or generate
is never swapped in: the previous one keeps serving and the reason is logged and shown on
``/health`` (``last_swap_error``). It is retried only when the alias moves again (re-promoting the
same version counts as a move).

The registry is the one passed (``None``: ``open_registry()``, the default location).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from tracelearn.models import LoadedModel, load_model, parse_registry_model, registry_model_source
from tracelearn.registry import LATEST_ALIAS, ArtifactVersion, Registry, open_registry
from tracelearn.serving.engine import GenerationEngine, StepOutput
from tracelearn.serving.engine_slot import EngineSlot
from tracelearn.serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_WATCH_INTERVAL_S = 2.0


@dataclass(frozen=True)
class _AliasState:
    """What the alias names now. ``move`` changes on every promotion, even to the same version."""

    version: ArtifactVersion
    move: int

    @property
    def key(self) -> tuple[int, str, int]:
        return self.version.version, self.version.digest, self.move


class AliasFollower:
    """Serves ``registry:NAME@ALIAS`` through ``slot`` and hot-swaps when the alias moves.

    The constructor loads the version the alias names now (errors propagate: there is nothing to
    serve yet). ``start`` polls every ``interval_s`` on a daemon thread; ``poll`` is one check, run
    synchronously. ``close`` stops polling and closes every engine.
    """

    def __init__(
        self,
        reference: str,
        *,
        registry: Registry | None = None,
        interval_s: float = DEFAULT_WATCH_INTERVAL_S,
        device: str = "auto",
        max_model_len: int | None = None,
        make_engine: Callable[[LoadedModel], GenerationEngine] = GenerationEngine,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"the watch interval must be positive, got {interval_s}")
        self.ref = parse_registry_model(reference)
        self.registry = registry or open_registry()
        self.interval_s = interval_s
        self._device = device
        self._max_model_len = max_model_len
        self._make_engine = make_engine
        state = self._read_alias()
        self._serving = state
        self._failed: tuple[int, str, int] | None = None
        self.slot = EngineSlot(self._prepare(state.version), following=str(self.ref))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def serving(self) -> ArtifactVersion:
        """The registry version new requests are answered by."""
        return self._serving.version

    def start(self) -> AliasFollower:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="tracelearn-alias-follower", daemon=True)
            self._thread.start()
        return self

    def poll(self) -> bool:
        """Check the alias once; load, warm up and swap in the version it names if it moved.
        Returns whether a swap happened. Failures are recorded on the slot, never raised.
        """
        try:
            state = self._read_alias()
        except Exception as error:  # the registry is unreachable for now: keep serving, say why
            self._record_failure(f"cannot read {self.ref} from {self.registry.location}: {_describe(error)}")
            return False
        if state.key in (self._serving.key, self._failed):
            return False
        if (state.version.version, state.version.digest) == (self.serving.version, self.serving.digest):
            self._serving = state  # re-promoted to what is already served: nothing to load
            return False
        logger.info("%s moved to %s; loading it (still serving %s)", self.ref, state.version.ref, self.serving.ref)
        try:
            engine = self._prepare(state.version)
        except Exception as error:  # anything wrong with the new version must not stop the server
            self._failed = state.key
            self._record_failure(f"{state.version.ref} was not swapped in: {_describe(error)}")
            return False
        try:
            latest = self._read_alias()
        except Exception:
            latest = state  # cannot re-check: the version we loaded is what the alias last named
        if latest.version.version != state.version.version:
            # The alias moved on while this version loaded: the next poll follows it from here.
            logger.info("%s moved to %s while %s loaded; not swapping that in", self.ref, latest.version.ref,
                        state.version.ref)
            engine.close()
            return False
        previous = self.serving
        self.slot.swap(engine)
        self._serving, self._failed = state, None
        logger.info("%s: now serving %s (was %s; requests in flight finish on it)", self.ref,
                    engine.model_version, previous.ref)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        self.stop()
        self.slot.close()

    def __enter__(self) -> AliasFollower:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # poll records its own failures; this guards the thread against the rest
                logger.exception("unexpected error while following %s", self.ref)

    def _read_alias(self) -> _AliasState:
        version = self.registry.resolve(self.ref)
        if self.ref.alias is None or self.ref.alias == LATEST_ALIAS:
            return _AliasState(version, 0)
        moves = self.registry.alias_moves(self.ref.name, self.ref.alias)
        return _AliasState(version, moves[-1].sequence if moves else 0)

    def _prepare(self, version: ArtifactVersion) -> GenerationEngine:
        """Resolve, verify and load ``version``, start its engine and generate one token with it."""
        source = registry_model_source(self.registry, version)
        loaded = load_model(source, device=self._device, max_model_len=self._max_model_len)
        engine = self._make_engine(loaded)
        try:
            _warm_up(engine)
        except BaseException:
            engine.close()
            raise
        return engine

    def _record_failure(self, message: str) -> None:
        full = f"{message}; still serving {self.slot.current.model_version}"
        logger.error("%s", full)
        self.slot.record_swap_failure(full)


class WarmUpError(RuntimeError):
    """A freshly loaded engine could not generate a token, so it was not swapped in."""


def _warm_up(engine: GenerationEngine, timeout_s: float = 120.0) -> None:
    """Generate one greedy token from a chat prompt: proves the template, weights and engine work
    end to end, and pays first-call costs before real requests arrive.
    """
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    done = threading.Event()
    outcome: list[StepOutput | BaseException] = []

    def listen(item: StepOutput | BaseException) -> None:
        outcome.append(item)
        done.set()

    cancel = engine.submit([int(i) for i in prompt], SamplingParams(max_tokens=1, temperature=0.0), listen)
    if not done.wait(timeout_s):
        cancel.set()
        raise WarmUpError(f"{engine.model_version} produced no token within {timeout_s:.0f} s")
    first = outcome[0]
    if isinstance(first, BaseException):
        raise WarmUpError(f"{engine.model_version} failed its first generation: {_describe(first)}") from first


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
