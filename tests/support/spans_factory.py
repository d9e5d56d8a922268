"""Realistic spans datasets for tests, written through the real capture path.

Spans are described as ``SpanRecord``s with the attributes an instrumented agent sets, turned into
rows by ``SpanColumns`` (the exporter's normalizer) and written by ``PartitionedParquetWriter``, so the
files have the real schema, partitioning, compression and version metadata.
"""

import datetime as dt
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tracelearn.collector.parquet_writer import PartitionedParquetWriter
from tracelearn.collector.span_rows import SpanColumns, SpanRecord
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import SPANS

EPOCH = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    """A time ``seconds`` after the factory's reference instant (2026-11-21 12:00 UTC)."""
    return EPOCH + dt.timedelta(seconds=seconds)


def _ns(when: dt.datetime) -> int:
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1) * 1_000


class SpansFactory:
    """Collects spans of a fake agent and writes them as a spans dataset under ``root``.

    Ids are plain integers (formatted as hex by the writer). ``identity`` attributes (rollout id,
    task id, group, agent) are given per span, as baggage would put them on every span.
    """

    def __init__(self, root: Path, service: str = "calc-agent") -> None:
        self.directory = root
        self.service = service
        self.records: list[SpanRecord] = []
        self._span_ids = itertools.count(1)

    def span(
        self,
        trace: int,
        name: str,
        start: float,
        end: float | None = None,
        parent: int | None = None,
        attributes: Mapping[str, Any] | None = None,
        status: str = "UNSET",
        span_id: int | None = None,
    ) -> int:
        """Add one span starting ``start`` seconds after the reference instant; returns its span id."""
        own_id = span_id if span_id is not None else next(self._span_ids)
        self.records.append(
            SpanRecord(
                trace_id=trace,
                span_id=own_id,
                parent_span_id=parent,
                name=name,
                kind="INTERNAL",
                start_ns=_ns(at(start)),
                end_ns=_ns(at(end if end is not None else start + 0.5)),
                status_code=status,
                status_message="failed" if status == "ERROR" else None,
                resource={sc.SERVICE_NAME: self.service},
                scope_name="tests.spans_factory",
                attributes=dict(attributes or {}),
            )
        )
        return own_id

    def root(self, trace: int, start: float, end: float, status: str = "UNSET", **identity: Any) -> int:
        """The agent's root span (no parent)."""
        return self.span(trace, "agent.run", start, end, attributes=_identity(identity), status=status)

    def llm(
        self,
        trace: int,
        parent: int | None,
        start: float,
        user: str,
        input_tokens: int = 10,
        output_tokens: int = 5,
        **identity: Any,
    ) -> int:
        """A chat completion span with Traceloop-style flattened prompt attributes."""
        attributes = {
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_REQUEST_MODEL: "smollm2-135m",
            f"{sc.GEN_AI_PROMPT_PREFIX}0.role": "system",
            f"{sc.GEN_AI_PROMPT_PREFIX}0.content": "You are a calculator.",
            f"{sc.GEN_AI_PROMPT_PREFIX}1.role": "user",
            f"{sc.GEN_AI_PROMPT_PREFIX}1.content": user,
            f"{sc.GEN_AI_COMPLETION_PREFIX}0.role": "assistant",
            f"{sc.GEN_AI_COMPLETION_PREFIX}0.content": "42",
            sc.GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
            sc.GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
            **_identity(identity),
        }
        return self.span(trace, "chat smollm2-135m", start, parent=parent, attributes=attributes)

    def tool(self, trace: int, parent: int | None, start: float, status: str = "UNSET", **identity: Any) -> int:
        """An ``execute_tool`` span."""
        attributes = {sc.GEN_AI_OPERATION_NAME: "execute_tool", sc.GEN_AI_TOOL_NAME: "add", **_identity(identity)}
        return self.span(trace, "execute_tool add", start, parent=parent, attributes=attributes, status=status)

    def reward(
        self,
        trace: int,
        parent: int | None,
        at_seconds: float,
        value: float,
        name: str = "reward",
        primary: bool | None = None,
        **identity: Any,
    ) -> int:
        """A ``tracelearn.reward`` span as ``emit_reward`` records it (instantaneous)."""
        attributes: dict[str, Any] = {
            sc.SPAN_TYPE: sc.TYPE_REWARD,
            sc.REWARD_NAME: name,
            sc.REWARD_VALUE: value,
            **_identity(identity),
        }
        if primary is not None:
            attributes[sc.REWARD_PRIMARY] = primary
        return self.span(trace, sc.SPAN_REWARD, at_seconds, at_seconds, parent=parent, attributes=attributes)

    def write(self) -> list[Path]:
        """Write every collected span as Parquet files under the root directory; returns the files written."""
        columns = SpanColumns()
        columns.add_all(self.records)
        writer = PartitionedParquetWriter(self.directory, SPANS)
        try:
            writer.add(columns.take())
            return writer.flush()
        finally:
            writer.close()


def _identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    keys = {"rollout_id": sc.ROLLOUT_ID, "task_id": sc.TASK_ID, "group_id": sc.GROUP_ID, "agent": sc.AGENT_NAME}
    return {keys[name]: value for name, value in identity.items() if value is not None}
