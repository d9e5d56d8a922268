"""Span processors installed by our configurator.

* ``RolloutContextSpanProcessor`` copies rollout identity from baggage onto each span at start,
  resolves which agent a span belongs to from its ancestors (frameworks name agents on outer spans),
  and records the process and thread that started the span (``process.pid``, ``thread.id``): with
  the messages, they join the LLM calls of an agent that opens no span of its own into rollouts.
* ``DurableBatchSpanProcessor`` replaces the SDK's BatchSpanProcessor, which silently drops spans
  when its 2048-span queue is full: ours has a large bound, blocks the producer briefly when full,
  counts and reports anything it still has to drop, and flushes whenever a rollout (root span) ends.
"""

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

from tracelearn.schemas import semconv as sc
from tracelearn.settings import Setting, SettingError
from tracelearn.settings.variables import QUEUE_BLOCK_MS, QUEUE_SIZE

logger = logging.getLogger(__name__)


def declared_agent(attributes: Mapping[str, Any], parent_kind: str | None) -> str | None:
    """The agent name a span declares, given the Traceloop kind of its parent.

    Declarations: ``gen_ai.agent.name``, a Traceloop ``agent`` or ``workflow`` entity, and a ``task``
    directly under a workflow (a LangGraph node, a top-level chain step). Tasks nested in tasks are
    framework internals (prompt templates, sequences) and declare nothing. The nearest declaring
    ancestor names a span's agent, so a graph's node beats the graph that contains it.
    """
    explicit = attributes.get(sc.GEN_AI_AGENT_NAME)
    if isinstance(explicit, str) and explicit:
        return explicit
    kind = attributes.get(sc.TRACELOOP_SPAN_KIND)
    entity = attributes.get(sc.TRACELOOP_ENTITY_NAME)
    if not isinstance(entity, str) or not entity:
        return None
    if kind in ("agent", "workflow") or (kind == "task" and parent_kind == "workflow"):
        return entity
    return None


class RolloutContextSpanProcessor(SpanProcessor):
    """Stamps rollout identity (from baggage), the inherited agent name, process and thread on every span at start."""

    def __init__(self) -> None:
        # Live spans only (removed at end): span_id -> (inherited agent, Traceloop kind of the span's
        # parent), enough to resolve the agent of the span's children.
        self._agents: dict[int, tuple[str | None, str | None]] = {}
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        try:
            self._stamp(span, parent_context)
        except Exception:  # instrumentation never raises into the agent
            logger.exception("tracelearn: stamping rollout context on a span failed")

    def _stamp(self, span: Span, parent_context: context.Context | None) -> None:
        # Cheap (two integers from the interpreter); what the pipeline's sequence rule reads.
        span.set_attribute(sc.PROCESS_PID, os.getpid())
        span.set_attribute(sc.THREAD_ID, threading.get_ident())
        for key in sc.BAGGAGE_KEYS:
            value = baggage.get_baggage(key, parent_context)
            if value is not None and (span.attributes is None or key not in span.attributes):
                span.set_attribute(key, str(value))
        parent = trace.get_current_span(parent_context)
        parent_ctx = parent.get_span_context()
        if not parent_ctx.is_valid or not isinstance(parent, ReadableSpan):
            self._remember(span, None, None)
            return
        # The parent's attributes are complete by now (frameworks set them right after starting it).
        parent_attributes = parent.attributes or {}
        with self._lock:
            inherited, grandparent_kind = self._agents.get(parent_ctx.span_id, (None, None))
        inherited = declared_agent(parent_attributes, grandparent_kind) or inherited
        if inherited is not None:
            span.set_attribute(sc.AGENT_INHERITED, inherited)
        parent_kind = parent_attributes.get(sc.TRACELOOP_SPAN_KIND)
        self._remember(span, inherited, parent_kind if isinstance(parent_kind, str) else None)

    def _remember(self, span: Span, agent_name: str | None, parent_kind: str | None) -> None:
        with self._lock:
            self._agents[span.get_span_context().span_id] = (agent_name, parent_kind)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None:
            with self._lock:
                self._agents.pop(span.context.span_id, None)

    def shutdown(self) -> None:
        with self._lock:
            self._agents.clear()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _setting_or_default(setting: Setting[int]) -> int:
    """A capture setting's value; a bad one is logged and the default used (capture never stops the agent)."""
    try:
        return setting.value()
    except SettingError as error:
        logger.warning("tracelearn: %s; using %s", error, setting.default)
        return setting.default_value()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        logger.warning("tracelearn: %s=%r is not an integer; using %d", name, raw, default)
        return default
    return value if value > 0 else default


class DurableBatchSpanProcessor(SpanProcessor):
    """Batches ended spans to an exporter on a worker thread, without silent drops.

    Queue bound ``max(OTEL_BSP_MAX_QUEUE_SIZE, TRACELEARN_QUEUE_SIZE)`` (default 65536 spans). When the
    queue is full, ``on_end`` waits up to ``TRACELEARN_QUEUE_BLOCK_MS`` (default 200 ms) for room; a
    span still without room is dropped, counted, and reported (a warning once, and at shutdown).
    A root span ending (the end of a rollout) triggers an export and a flush of the exporter.
    """

    def __init__(
        self,
        span_exporter: SpanExporter,
        max_queue_size: int | None = None,
        schedule_delay_millis: int | None = None,
        max_export_batch_size: int | None = None,
        block_millis: int | None = None,
    ) -> None:
        self.exporter = span_exporter
        self.max_queue_size = max_queue_size or max(
            _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048), _setting_or_default(QUEUE_SIZE)
        )
        self.schedule_delay = (schedule_delay_millis or _env_int("OTEL_BSP_SCHEDULE_DELAY", 1000)) / 1000
        self.max_export_batch_size = max_export_batch_size or _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2048)
        self.block_seconds = (block_millis or _setting_or_default(QUEUE_BLOCK_MS)) / 1000
        self.dropped = 0
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._condition = threading.Condition()
        self._flush_requested = 0
        self._flushes_done = 0
        self._shutdown = False
        self._warned_drop = False
        self._worker = self._start_worker()
        os.register_at_fork(after_in_child=self._restart_after_fork)

    def _start_worker(self) -> threading.Thread:
        worker = threading.Thread(target=self._run, name="tracelearn-span-export", daemon=True)
        worker.start()
        return worker

    def _restart_after_fork(self) -> None:
        # The worker thread does not survive fork; the child starts its own with an empty queue.
        self._queue.clear()
        self._condition = threading.Condition()
        self._worker = self._start_worker()

    def on_start(self, span: Span, parent_context: context.Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown or not span.context or not span.context.trace_flags.sampled:
            return
        with self._condition:
            if len(self._queue) >= self.max_queue_size:
                deadline = time.monotonic() + self.block_seconds
                while len(self._queue) >= self.max_queue_size and time.monotonic() < deadline:
                    self._condition.wait(deadline - time.monotonic())
                if len(self._queue) >= self.max_queue_size:
                    self._count_drop()
                    return
            self._queue.append(span)
            if span.parent is None:
                self._flush_requested += 1
            if span.parent is None or len(self._queue) >= self.max_export_batch_size:
                self._condition.notify_all()

    def _count_drop(self) -> None:
        self.dropped += 1
        if not self._warned_drop:
            self._warned_drop = True
            logger.warning(
                "tracelearn: span queue full (%d spans) for %.0f ms; dropping spans and counting them. "
                "Raise TRACELEARN_QUEUE_SIZE or check that the exporter keeps up.",
                self.max_queue_size,
                self.block_seconds * 1000,
            )

    def _take_batch(self) -> list[ReadableSpan]:
        count = min(len(self._queue), self.max_export_batch_size)
        return [self._queue.popleft() for _ in range(count)]

    def _run(self) -> None:
        while True:
            with self._condition:
                if (
                    len(self._queue) < self.max_export_batch_size
                    and not self._shutdown
                    and self._flush_requested == self._flushes_done
                ):
                    self._condition.wait(self.schedule_delay)
                batch = self._take_batch()
                flush_target = self._flush_requested
                stopping = self._shutdown
                self._condition.notify_all()  # producers blocked on a full queue
            if batch:
                self._export(batch)
            with self._condition:
                drained = not self._queue
            if drained and flush_target > self._flushes_done:
                self._flush_exporter()
                with self._condition:
                    self._flushes_done = flush_target
                    self._condition.notify_all()
            if stopping and drained:
                return

    def _export(self, batch: Sequence[ReadableSpan]) -> None:
        # A refused batch is the exporter's to report (ours logs and counts what it loses).
        try:
            self.exporter.export(batch)
        except Exception:
            logger.exception("tracelearn: span exporter raised; %d spans not exported", len(batch))

    def _flush_exporter(self) -> None:
        try:
            self.exporter.force_flush()
        except Exception:
            logger.exception("tracelearn: flushing the span exporter failed")

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        with self._condition:
            self._flush_requested += 1
            target = self._flush_requested
            self._condition.notify_all()
            while self._flushes_done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._worker.is_alive():
                    return False
                self._condition.wait(remaining)
        return True

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self.force_flush()
        with self._condition:
            self._shutdown = True
            self._condition.notify_all()
        self._worker.join(timeout=30)
        if self.dropped:
            logger.warning("tracelearn: %d spans were dropped because the queue stayed full", self.dropped)
        try:
            self.exporter.shutdown()
        except Exception:
            logger.exception("tracelearn: shutting the span exporter down failed")
