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

from tracelearn.collector import attribute_values as av
from tracelearn.collector import normalize as nz
from tracelearn.schemas import messages as mc
from tracelearn.schemas import semconv as sc
from tracelearn.schemas.tables import SPANS, STRING_MAP
from tracelearn.storage.atomic_files import Partition, path_segment_safe

logger = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000
# Promoted into typed columns and not repeated (as JSON text) in the raw attribute map.
TYPED_ONLY_ATTRIBUTES = frozenset({sc.PROMPT_TOKEN_IDS, sc.RESPONSE_TOKEN_IDS, sc.RESPONSE_LOGPROBS})

# The promoted LLM columns of a span that names no model (most framework, tool and reward spans).
NOT_LLM = nz.LLMColumns(None, None, None, None, None, None, None, None, None, None, None, None, None)

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


def plain_attributes(attributes: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The plain dict behind the SDK's ``BoundedAttributes`` (read-only use), else a copy.

    Every look-up on ``BoundedAttributes`` runs Python code and a span's attributes are read some
    thirty times on the way to a row; an ended span's attributes no longer change, so reading its
    underlying dict (a private field of the pinned SDK version) is safe and saves the copy too.
    """
    if attributes is None:
        return {}
    inner = getattr(attributes, "_dict", None)
    if type(inner) is dict:
        return inner
    return dict(attributes)


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
        attributes=plain_attributes(span.attributes),
        events=[(e.name, e.timestamp, plain_attributes(e.attributes)) for e in span.events],
        links=[(link.context.trace_id, link.context.span_id, plain_attributes(link.attributes)) for link in span.links],
    )


def service_of(resource: Mapping[str, Any]) -> str:
    value = resource.get(sc.SERVICE_NAME)
    return value if isinstance(value, str) and value else "unknown_service"


# The row tuple holds every column but ``attributes``, which is kept as flat key/value lists.
ROW_COLUMNS = tuple(name for name in SPANS.schema.names if name != "attributes")


@dataclass(slots=True)
class PartitionRows:
    """Spans buffered for one partition: a tuple per span plus the flat attribute map."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    attribute_keys: list[str] = field(default_factory=list)
    attribute_values: list[str] = field(default_factory=list)
    attribute_offsets: list[int] = field(default_factory=lambda: [0])


class SpanColumns:
    """Accumulates spans column by column, per partition, and emits Arrow batches."""

    def __init__(self, max_attribute_bytes: int = 8 * 1024 * 1024) -> None:
        self.max_attribute_bytes = max_attribute_bytes
        self.truncated_values = 0
        self._buffers: dict[Partition, PartitionRows] = {}
        self._days: dict[int, str] = {}
        self._service_segments: dict[str, str] = {}
        # Spans of one process share one resource object: its string map is computed once and reused
        # (with the number of values it truncated, so ``truncated_values`` counts as if recomputed).
        # Keyed by identity, so a record's resource mapping must not change after it is added (SDK
        # resources are immutable; a receiver builds a new mapping per resource).
        self._resource_map: tuple[Mapping[str, Any], int, int] | None = None
        # Distinct resource string maps as (keys, values); rows store an index into this list.
        self._resources: list[tuple[list[str], list[str]]] = []

    def __len__(self) -> int:
        return sum(len(buffer.rows) for buffer in self._buffers.values())

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

    def _string_map(self, attributes: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Attributes as (key, text) pairs, for the nested maps of events and links (rare, small)."""
        keys: list[str] = []
        values: list[str] = []
        self._append_string_map(attributes, keys, values, frozenset())
        return list(zip(keys, values, strict=True))

    def _append_string_map(
        self, attributes: Mapping[str, Any], keys: list[str], values: list[str], skip: frozenset[str]
    ) -> None:
        # The hot loop of capture (every attribute of every span); strings, most values, are kept as-is.
        # Flat key and value lists (one Arrow MapArray per batch) instead of a list of pairs per span:
        # no tuple per attribute, and Arrow copies two string lists instead of parsing nested ones.
        limit = self.max_attribute_bytes
        attribute_text = av.attribute_text
        for key, value in attributes.items():
            if key in skip:
                continue
            text = value if type(value) is str else attribute_text(value)
            if len(text) > limit:
                text = self._truncated(text)
            keys.append(key if type(key) is str else str(key))
            values.append(text)

    def _resource_index(self, resource: Mapping[str, Any]) -> int:
        """Index of ``resource``'s string map among the distinct resources seen by this builder."""
        cached = self._resource_map
        if cached is not None and cached[0] is resource:
            self.truncated_values += cached[2]
            return cached[1]
        before = self.truncated_values
        keys: list[str] = []
        values: list[str] = []
        self._append_string_map(resource, keys, values, frozenset())
        self._resources.append((keys, values))
        index = len(self._resources) - 1
        self._resource_map = (resource, index, self.truncated_values - before)
        return index

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
        get = attrs.get
        service = service_of(record.resource)
        partition = (self._day(record.start_ns), self._service_segment(service))
        buffer = self._buffers.get(partition)
        if buffer is None:
            buffer = self._buffers[partition] = PartitionRows()
        kind = nz.span_type(record.name, attrs)
        is_llm = kind == sc.TYPE_LLM
        trace_hex = format(record.trace_id, "032x")
        rollout_id = get(sc.ROLLOUT_ID)
        self._append_string_map(attrs, buffer.attribute_keys, buffer.attribute_values, TYPED_ONLY_ATTRIBUTES)
        buffer.attribute_offsets.append(len(buffer.attribute_keys))

        if is_llm:
            llm = nz.llm_columns(attrs, record.events)
        elif (
            kind == sc.TYPE_MESSAGE
            or sc.GEN_AI_REQUEST_MODEL in attrs
            or sc.GEN_AI_RESPONSE_MODEL in attrs
            or sc.GEN_AI_RESPONSE_ID in attrs
            or sc.GEN_AI_RESPONSE_FINISH_REASONS in attrs
        ):
            # Framework spans around calls may name models too (CrewAI's agent span); messages are
            # the LLM calls' (and our own message spans').
            llm = nz.LLMColumns(
                None,
                mc.compact_json([{"role": get(sc.MESSAGE_ROLE), "content": get(sc.MESSAGE_CONTENT)}])
                if kind == sc.TYPE_MESSAGE
                else None,
                None,
                None,
                _str_or_none(get(sc.GEN_AI_REQUEST_MODEL)),
                _str_or_none(get(sc.GEN_AI_RESPONSE_MODEL)),
                _str_or_none(get(sc.GEN_AI_RESPONSE_ID)),
                nz.finish_reason_of(get(sc.GEN_AI_RESPONSE_FINISH_REASONS)),
                None,
                None,
                None,
                nz.model_version_of(attrs),  # a token-id span names the version its response carried
                None,
            )
        else:
            llm = NOT_LLM
        operation = get(sc.GEN_AI_OPERATION_NAME)
        reward = reward_name = reward_is_primary = None
        if kind == sc.TYPE_REWARD:
            reward = av.as_float(get(sc.REWARD_VALUE))
            reward_name = _str_or_none(get(sc.REWARD_NAME)) or "reward"
            primary = get(sc.REWARD_PRIMARY)
            reward_is_primary = primary if isinstance(primary, bool) else primary in ("true", "1")
        status = get(sc.TOKEN_IDS_STATUS)
        events = record.events
        links = record.links
        # One tuple per span in schema order (see ROW_COLUMNS); columns are formed once per batch.
        buffer.rows.append(
            (
                trace_hex,
                format(record.span_id, "016x"),
                format(record.parent_span_id, "016x") if record.parent_span_id is not None else None,
                record.name,
                record.kind,
                record.start_ns,
                record.end_ns,
                record.end_ns - record.start_ns,
                record.status_code,
                record.status_message or None,
                service,
                record.scope_name,
                self._resource_index(record.resource),
                [{"name": name, "time": time_ns, "attributes": self._string_map(a)} for name, time_ns, a in events]
                if events
                else None,
                [
                    {"trace_id": format(t, "032x"), "span_id": format(s, "016x"), "attributes": self._string_map(a)}
                    for t, s, a in links
                ]
                if links
                else None,
                kind,
                str(rollout_id) if rollout_id is not None else trace_hex,
                _str_or_none(get(sc.ATTEMPT_ID)),
                _str_or_none(get(sc.TASK_ID)),
                _str_or_none(get(sc.GROUP_ID)),
                nz.agent_name_of(attrs, record.name),
                operation if type(operation) is str else nz.operation_name_of(kind, attrs),
                llm.request_model,
                llm.response_model,
                llm.response_id,
                llm.finish_reason,
                llm.input_messages,
                llm.output_messages,
                llm.input_tokens,
                llm.output_tokens,
                llm.temperature,
                llm.top_p,
                llm.top_k,
                llm.model_version,
                llm.messages_problem,
                av.int_list(get(sc.PROMPT_TOKEN_IDS)),
                av.int_list(get(sc.RESPONSE_TOKEN_IDS)),
                av.float_list(get(sc.RESPONSE_LOGPROBS)),
                str(status) if status is not None else (sc.TOKEN_IDS_NOT_CAPTURED if is_llm else None),
                nz.tool_name_of(record.name, attrs) if kind == sc.TYPE_TOOL else None,
                reward,
                reward_name,
                reward_is_primary,
            )
        )
        return partition

    def add_all(self, records: Iterable[SpanRecord]) -> None:
        for record in records:
            self.add(record)

    def take(self) -> dict[Partition, pa.RecordBatch]:
        """The accumulated rows as one record batch per partition; the builder is emptied."""
        buffers, self._buffers = self._buffers, {}
        resources, self._resources, self._resource_map = self._resources, [], None
        return {partition: _to_batch(buffer, resources) for partition, buffer in buffers.items()}


_str_or_none = av.str_or_none


def _checked_array(values: list[Any], type_: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        # Strings with lone surrogates (non-UTF-8 bytes decoded with surrogateescape) cannot be
        # encoded as Arrow UTF-8; replace the offending characters instead of losing the span.
        return pa.array(_replace_invalid_utf8(values), type=type_)


def _string_map_array(offsets: list[int], keys: list[str], values: list[str]) -> pa.Array:
    return pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()),
        _checked_array(keys, pa.string()),
        _checked_array(values, pa.string()),
        type=STRING_MAP,
    )


def _resource_array(indices: Sequence[int], resources: Sequence[tuple[list[str], list[str]]]) -> pa.Array:
    """Each row's resource map, from its index into the batch's distinct resources.

    Built flat like the attribute map: ``take`` on a map array costs more than the rest of the
    resource column for a rollout-sized batch.
    """
    offsets, keys, values = [0], [], []
    for index in indices:
        resource_keys, resource_values = resources[index]
        keys += resource_keys
        values += resource_values
        offsets.append(len(keys))
    return _string_map_array(offsets, keys, values)


def _column_array(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    # Most promoted columns are empty for most spans (rewards, token ids, tools, events, links):
    # an all-null array skips Arrow's per-value conversion, which costs most for nested types.
    if values.count(None) == len(values):
        return pa.nulls(len(values), type_)
    return _checked_array(list(values), type_)


def _to_batch(buffer: "PartitionRows", resources: Sequence[tuple[list[str], list[str]]]) -> pa.RecordBatch:
    columns = dict(zip(ROW_COLUMNS, zip(*buffer.rows, strict=True), strict=True))
    arrays = []
    for spec_field in SPANS.schema:
        if spec_field.name == "attributes":
            arrays.append(_string_map_array(buffer.attribute_offsets, buffer.attribute_keys, buffer.attribute_values))
        elif spec_field.name == "resource_attributes":
            arrays.append(_resource_array(columns["resource_attributes"], resources))
        else:
            arrays.append(_column_array(columns[spec_field.name], spec_field.type))
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
