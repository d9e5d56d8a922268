"""Rollout identity: the ``rollout(...)`` context manager / decorator and ``agent(...)``.

Identity travels in OpenTelemetry baggage, so it follows the OTel context into threads (when the
context is propagated), asyncio tasks (contextvars are copied at task creation) and, with W3C baggage
propagation, other processes. ``RolloutContextSpanProcessor`` copies it onto every span at start, so
it reaches the Parquet exporter and an OTLP sidecar alike.

Without any of this, one trace is one rollout and the task id is derived from the first user message.
"""

import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from opentelemetry import baggage, context, trace
from opentelemetry.trace import Status, StatusCode

from tracelearn.schemas import semconv as sc

logger = logging.getLogger(__name__)


def _tracer() -> trace.Tracer:
    # Looked up per call: a module-level proxy tracer would stay bound to the first provider it saw.
    return trace.get_tracer("tracelearn")


P = ParamSpec("P")
R = TypeVar("R")

FLUSH_TIMEOUT_MILLIS = 10_000


def flush_traces(timeout_millis: int = FLUSH_TIMEOUT_MILLIS) -> None:
    """Ask the global tracer provider to flush (the rollout's spans are spooled to disk, fsynced).

    A no-op when no SDK provider is configured; never raises into the agent.
    """
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is None:
        return
    try:
        force_flush(timeout_millis)
    except Exception:
        logger.exception("tracelearn: flushing spans at the end of a rollout failed")


class rollout:  # noqa: N801 - used as a context manager and decorator, so lowercase like contextlib's
    """Mark a block (``with``) or a function (decorator, sync or async) as one rollout.

    ``task_id`` names the task (GRPO groups form over rollouts of one task), ``group`` a coarser group
    key, ``rollout_id`` / ``attempt_id`` override the generated ids, ``agent`` names the agent,
    ``metadata`` adds ``tracelearn.metadata.*`` attributes (task metadata for reward functions).
    On exit the spans are flushed so the rollout lands on disk as soon as it ends.
    """

    def __init__(
        self,
        task_id: str | None = None,
        group: str | None = None,
        *,
        rollout_id: str | None = None,
        attempt_id: str | None = None,
        agent: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.task_id = task_id
        self.group = group
        self.rollout_id = rollout_id
        self.attempt_id = attempt_id
        self.agent = agent
        self.metadata = dict(metadata or {})
        self._tokens: list[tuple[object, trace.Span]] = []

    def identity(self) -> dict[str, str]:
        """The baggage entries this rollout sets (a fresh rollout id unless one was given)."""
        values = {
            sc.ROLLOUT_ID: self.rollout_id or uuid.uuid4().hex,
            sc.ATTEMPT_ID: self.attempt_id,
            sc.TASK_ID: self.task_id,
            sc.GROUP_ID: self.group,
            sc.AGENT_NAME: self.agent,
        }
        return {key: str(value) for key, value in values.items() if value is not None}

    def __enter__(self) -> "rollout":
        ctx = context.get_current()
        identity = self.identity()
        for key, value in identity.items():
            ctx = baggage.set_baggage(key, value, context=ctx)
        attributes: dict[str, Any] = {**identity, sc.SPAN_TYPE: sc.TYPE_ROLLOUT}
        for key, value in self.metadata.items():
            attributes[sc.METADATA_PREFIX + key] = value if isinstance(value, str | int | float | bool) else str(value)
        span = _tracer().start_span(sc.SPAN_ROLLOUT, context=ctx, attributes=attributes)
        token = context.attach(trace.set_span_in_context(span, ctx))
        self._tokens.append((token, span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        token, span = self._tokens.pop()
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()
        context.detach(token)  # type: ignore[arg-type]
        flush_traces()

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self._copy():
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._copy():
                return fn(*args, **kwargs)

        return run

    def _copy(self) -> "rollout":
        # Each call of a decorated function is its own rollout with its own id.
        return rollout(
            self.task_id,
            self.group,
            rollout_id=self.rollout_id,
            attempt_id=self.attempt_id,
            agent=self.agent,
            metadata=self.metadata,
        )


class agent:  # noqa: N801 - a context manager, lowercase like contextlib's
    """Name the agent for the calls made inside the block (multi-agent rollouts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tokens: list[object] = []

    def __enter__(self) -> "agent":
        self._tokens.append(context.attach(baggage.set_baggage(sc.AGENT_NAME, self.name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        context.detach(self._tokens.pop())  # type: ignore[arg-type]
