"""Spans as rows of the spans table: a neutral ``SpanRecord`` and a columnar batch builder.

Both the in-process exporter (from SDK ``ReadableSpan``) and the OTLP receiver (from protobuf) produce
``SpanRecord``s; ``SpanColumns`` turns them into Arrow record batches of the spans schema, one batch
per hive partition (``date``, ``service``). Columns are filled as Python lists and converted once per
batch: per span the work is a handful of dict look-ups, which keeps capture cheap.
"""

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from opentelemetry.sdk.trace import ReadableSpan

from tracelearn.collector import normalize as nz
from tracelearn.collector.parquet_writer import path_segment_safe
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import SPANS

logger = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000
# Promoted into typed columns and not repeated (as JSON text) in the raw attribute map.
TYPED_ONLY_ATTRIBUTES = frozenset({sc.PROMPT_TOKEN_IDS, sc.RESPONSE_TOKEN_IDS, sc.RESPONSE_LOGPROBS})

Partition = tuple[str, ...]
SpanEvent = tuple[str, int, Mapping[str, Any]]
SpanLink = tuple[int, int, Mapping[str, Any]]


@dataclass(slots=True)
class SpanRecord:
    """One span, independent of where it came from (SDK object or OTLP message)."""

    trace_id: int
    span_id: int
    parent_span_id: int | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status_code: str
    status_message: str | None
    resource: Mapping[str, Any]
    scope_name: str | None
    attributes: Mapping[str, Any]
    events: Sequence[SpanEvent] = field(default_factory=tuple)
    links: Sequence[SpanLink] = field(default_factory=tuple)


def from_readable_span(span: ReadableSpan) -> SpanRecord:
    """An SDK span as a ``SpanRecord``."""
    ctx = span.context
    assert ctx is not None, "an ended SDK span always has a context"
    return SpanRecord(
        trace_id=ctx.trace_id,
        span_id=ctx.span_id,
        parent_span_id=span.parent.span_id if span.parent is not None else None,
        name=span.name,
        kind=span.kind.name,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status_code=span.status.status_code.name,
        status_message=span.status.description,
        resource=span.resource.attributes,
        scope_name=span.instrumentation_scope.name if span.instrumentation_scope else None,
        # Plain dict copies: the SDK's BoundedAttributes answers every look-up in Python code, and a
        # span's attributes are read some thirty times on the way to a row.
        attributes=dict(span.attributes or {}),
        events=[(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        links=[(link.context.trace_id, link.context.span_id, dict(link.attributes or {})) for link in span.links],
    )


def service_of(resource: Mapping[str, Any]) -> str:
    value = resource.get(sc.SERVICE_NAME)
    return value if isinstance(value, str) and value else "unknown_service"


COLUMNS = tuple(SPANS.schema.names)


class SpanColumns:
    """Accumulates spans column by column, per partition, and emits Arrow batches."""

    def __init__(self, max_attribute_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_attribute_bytes = max_attribute_bytes
        self.truncated_values = 0
        self._columns: dict[Partition, dict[str, list[Any]]] = {}
        self._days: dict[int, str] = {}
        self._service_segments: dict[str, str] = {}
        # Spans of one process share one resource object: its string map is computed once and reused
        # (with the number of values it truncated, so ``truncated_values`` counts as if recomputed).
        # Keyed by identity, so a record's resource mapping must not change after it is added (SDK
        # resources are immutable; a receiver builds a new mapping per resource).
        self._resource_map: tuple[Mapping[str, Any], list[tuple[str, str]], int] | None = None

    def __len__(self) -> int:
        return sum(len(cols["trace_id"]) for cols in self._columns.values())

    def _truncated(self, text: str) -> str:
        """``text`` cut to ``max_attribute_bytes``, counted (and logged the first time)."""
        self.truncated_values += 1
        if self.truncated_values == 1:
            logger.warning(
                "tracelearn: an attribute value of %d characters was truncated to %d "
                "(TRACELEARN_MAX_ATTRIBUTE_BYTES); further truncations are only counted",
                len(text),
                self.max_attribute_bytes,
            )
        return text[: self.max_attribute_bytes]

    def _string_map(self, attributes: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
        # The hot loop of capture (every attribute of every span): strings, most values, are kept as-is.
        limit = self.max_attribute_bytes
        attribute_text = nz.attribute_text
        pairs = []
        for key, value in attributes.items():
            if key in skip:
                continue
            text = value if type(value) is str else attribute_text(value)
            if len(text) > limit:
                text = self._truncated(text)
            pairs.append((key if type(key) is str else str(key), text))
        return pairs

    def _resource_attributes(self, resource: Mapping[str, Any]) -> list[tuple[str, str]]:
        cached = self._resource_map
        if cached is not None and cached[0] is resource:
            self.truncated_values += cached[2]
            return cached[1]
        before = self.truncated_values
        pairs = self._string_map(resource)
        self._resource_map = (resource, pairs, self.truncated_values - before)
        return pairs

    def _service_segment(self, service: str) -> str:
        segment = self._service_segments.get(service)
        if segment is None:
            segment = path_segment_safe(service)
            self._service_segments[service] = segment
        return segment

    def _day(self, start_ns: int) -> str:
        day = start_ns // NS_PER_DAY
        text = self._days.get(day)
        if text is None:
            text = (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()
            self._days[day] = text
        return text

    def add(self, record: SpanRecord) -> Partition:
        """Append one span; returns its partition."""
        attrs = record.attributes
        service = service_of(record.resource)
        partition = (self._day(record.start_ns), self._service_segment(service))
        cols = self._columns.get(partition)
        if cols is None:
            cols = {name: [] for name in COLUMNS}
            self._columns[partition] = cols
        kind = nz.span_type(record.name, attrs)
        is_llm = kind == sc.TYPE_LLM
        trace_hex = format(record.trace_id, "032x")
        rollout_id = attrs.get(sc.ROLLOUT_ID)

        cols["trace_id"].append(trace_hex)
        cols["span_id"].append(format(record.span_id, "016x"))
        cols["parent_span_id"].append(
            format(record.parent_span_id, "016x") if record.parent_span_id is not None else None
        )
        cols["name"].append(record.name)
        cols["kind"].append(record.kind)
        cols["start_time"].append(record.start_ns)
        cols["end_time"].append(record.end_ns)
        cols["duration_ns"].append(record.end_ns - record.start_ns)
        cols["status_code"].append(record.status_code)
        cols["status_message"].append(record.status_message or None)
        cols["service_name"].append(service)
        cols["scope_name"].append(record.scope_name)
        cols["resource_attributes"].append(self._resource_attributes(record.resource))
        cols["attributes"].append(self._string_map(attrs, TYPED_ONLY_ATTRIBUTES))
        cols["events"].append(
            [{"name": name, "time": time_ns, "attributes": self._string_map(a)} for name, time_ns, a in record.events]
            or None
        )
        cols["links"].append(
            [
                {"trace_id": format(t, "032x"), "span_id": format(s, "016x"), "attributes": self._string_map(a)}
                for t, s, a in record.links
            ]
            or None
        )
        cols["span_type"].append(kind)
        cols["rollout_id"].append(str(rollout_id) if rollout_id is not None else trace_hex)
        cols["attempt_id"].append(_str_or_none(attrs.get(sc.ATTEMPT_ID)))
        cols["task_id"].append(_str_or_none(attrs.get(sc.TASK_ID)))
        cols["group_id"].append(_str_or_none(attrs.get(sc.GROUP_ID)))
        cols["agent_name"].append(nz.agent_name_of(attrs))
        cols["operation_name"].append(_str_or_none(attrs.get(sc.GEN_AI_OPERATION_NAME)))
        cols["request_model"].append(_str_or_none(attrs.get(sc.GEN_AI_REQUEST_MODEL)))
        cols["response_model"].append(_str_or_none(attrs.get(sc.GEN_AI_RESPONSE_MODEL)))
        cols["response_id"].append(_str_or_none(attrs.get(sc.GEN_AI_RESPONSE_ID)))
        cols["finish_reason"].append(nz.first_of(attrs.get(sc.GEN_AI_RESPONSE_FINISH_REASONS)))
        if is_llm:
            cols["input_messages"].append(nz.messages_json(nz.input_messages(attrs)))
            cols["output_messages"].append(nz.messages_json(nz.output_messages(attrs)))
            cols["input_tokens"].append(
                nz.as_int(attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS, attrs.get(sc.GEN_AI_USAGE_PROMPT_TOKENS_OLD)))
            )
            cols["output_tokens"].append(
                nz.as_int(attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS, attrs.get(sc.GEN_AI_USAGE_COMPLETION_TOKENS_OLD)))
            )
        elif kind == sc.TYPE_MESSAGE:
            message = {"role": attrs.get(sc.MESSAGE_ROLE), "content": attrs.get(sc.MESSAGE_CONTENT)}
            cols["input_messages"].append(None)
            cols["output_messages"].append(nz.messages_json([message]))
            cols["input_tokens"].append(None)
            cols["output_tokens"].append(None)
        else:
            cols["input_messages"].append(None)
            cols["output_messages"].append(None)
            cols["input_tokens"].append(None)
            cols["output_tokens"].append(None)
        cols["prompt_token_ids"].append(nz.int_list(attrs.get(sc.PROMPT_TOKEN_IDS)))
        cols["response_token_ids"].append(nz.int_list(attrs.get(sc.RESPONSE_TOKEN_IDS)))
        cols["response_logprobs"].append(nz.float_list(attrs.get(sc.RESPONSE_LOGPROBS)))
        status = attrs.get(sc.TOKEN_IDS_STATUS)
        cols["token_ids_status"].append(
            str(status) if status is not None else (sc.TOKEN_IDS_NOT_CAPTURED if is_llm else None)
        )
        cols["tool_name"].append(nz.tool_name_of(record.name, attrs) if kind == sc.TYPE_TOOL else None)
        if kind == sc.TYPE_REWARD:
            cols["reward"].append(nz.as_float(attrs.get(sc.REWARD_VALUE)))
            cols["reward_name"].append(_str_or_none(attrs.get(sc.REWARD_NAME)) or "reward")
            primary = attrs.get(sc.REWARD_PRIMARY)
            cols["reward_is_primary"].append(primary if isinstance(primary, bool) else primary in ("true", "1"))
        else:
            cols["reward"].append(None)
            cols["reward_name"].append(None)
            cols["reward_is_primary"].append(None)
        return partition

    def add_all(self, records: Iterable[SpanRecord]) -> None:
        for record in records:
            self.add(record)

    def take(self) -> dict[Partition, pa.RecordBatch]:
        """The accumulated rows as one record batch per partition; the builder is emptied."""
        columns, self._columns = self._columns, {}
        return {partition: _to_batch(cols) for partition, cols in columns.items()}


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else nz.attribute_text(value)


def _to_batch(cols: dict[str, list[Any]]) -> pa.RecordBatch:
    arrays = []
    for spec_field in SPANS.schema:
        values = cols[spec_field.name]
        try:
            arrays.append(pa.array(values, type=spec_field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
            # Strings with lone surrogates (non-UTF-8 bytes decoded with surrogateescape) cannot be
            # encoded as Arrow UTF-8; replace the offending characters instead of losing the span.
            arrays.append(pa.array(_replace_invalid_utf8(values), type=spec_field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SPANS.schema)


def _replace_invalid_utf8(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [_replace_invalid_utf8(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace_invalid_utf8(v) for v in value)
    if isinstance(value, dict):
        return {k: _replace_invalid_utf8(v) for k, v in value.items()}
    return value
