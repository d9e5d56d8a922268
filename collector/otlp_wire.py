"""The OTLP protobuf wire format, read just deep enough to keep parsing memory bounded.

Parsing a whole ``ExportTraceServiceRequest`` at once lets one body decide how much memory the
parser takes: upb allocates ~170 bytes per sub-message, and an empty sub-message costs 2 bytes on
the wire, so a 15 MB body of empty spans takes 1.4 GB. Instead the receiver reads the request's
outer layers here (resource spans, scope spans: where each span, resource and scope lies, a few
Python steps per span, 16 bytes of offsets kept per span and asked of the caller's memory budget
as they grow) and hands the parser one span at a time (``parse_span``). A span larger than
``SMALL_MESSAGE_BYTES`` is first costed from its own wire structure (``parse_cost``) and refused if
parsing it would take more than ``4 x its size + 1 MiB``; a smaller one costs at most
``DENSE_FACTOR`` times its size (~5.4 MB) for the moment it is parsed. A resource's attributes are
parsed one by one, the first ``limit`` of them only, each costed exactly first.

Owns no validation of span content (``otlp_decode`` does that); only the layout and the memory bound.

May import: protobuf messages of opentelemetry-proto. Nothing else of tracelearn.
"""

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

# A request body as read: the HTTP front fills a bytearray as the bytes arrive, gRPC hands over bytes.
Body = bytes | bytearray
# Below this size a message is parsed without looking inside first: even made of empty sub-messages
# it costs at most SMALL_MESSAGE_BYTES * DENSE_FACTOR bytes of parser memory.
SMALL_MESSAGE_BYTES = 64 * 1024
# Parser bytes per wire byte in the worst case (empty sub-messages: ~170 bytes each for 2 wire bytes).
DENSE_FACTOR = 85
# Parser bytes per sub-message (the measured upper end, a Span) and per string byte.
MESSAGE_BYTES = 170
# A message larger than SMALL_MESSAGE_BYTES is parsed only if it costs at most this much.
PARSE_SLACK_BYTES = 1 << 20


def parse_budget(size: int) -> int:
    """The most parser memory a message of ``size`` wire bytes may take: ``4 x size + 1 MiB``."""
    return 4 * size + PARSE_SLACK_BYTES


def parse_reservation(largest_message: int) -> int:
    """Memory to hold for parsing, one at a time, messages of at most ``largest_message`` bytes.

    A small message is parsed unexamined, so its worst case counts; a larger one was costed and
    refused above its budget (``check_parse_cost``).
    """
    if largest_message < SMALL_MESSAGE_BYTES:
        return MESSAGE_BYTES + largest_message * DENSE_FACTOR
    return parse_budget(largest_message)


class WireFormatError(ValueError):
    """The body is not a well-formed protobuf message at the layers read here."""


class DenseMessageError(ValueError):
    """A message would take more parser memory than its budget (``str`` says which and how much)."""


def _varint(buf: Body, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise WireFormatError(f"a varint at byte {pos} is cut off or longer than 10 bytes")


def length_delimited_fields(buf: Body, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of each length-delimited field of the message in ``buf[start:end]``.

    Other fields (varints, fixed 32/64-bit values) are stepped over; groups and truncated or
    overlong fields raise ``WireFormatError``. A generator: a message of millions of tiny fields is
    walked, never held.
    """
    pos = start
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos, end)
        if tag >> 3 == 0:
            raise WireFormatError(f"field number 0 at byte {pos}")
        wire_type = tag & 7
        if wire_type == 2:
            length = buf[pos] if pos < end else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buf, pos, end)
            value_end = pos + length
            if value_end > end:
                raise WireFormatError(f"field {tag >> 3} at byte {pos} runs {value_end - end} bytes past its message")
            yield tag >> 3, pos, value_end
            pos = value_end
        elif wire_type == 0:
            _, pos = _varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise WireFormatError(f"wire type {wire_type} (field {tag >> 3}) at byte {pos} is not used by OTLP")
    if pos != end:
        raise WireFormatError(f"the last field runs {pos - end} bytes past its message")


@dataclass(slots=True)
class ScopeLayout:
    """One ``ScopeSpans``: its scope message and where its spans start and end (offsets into the body)."""

    scope: tuple[int, int] | None = None
    starts: "array[int]" = field(default_factory=lambda: array("Q"))
    ends: "array[int]" = field(default_factory=lambda: array("Q"))


@dataclass(slots=True)
class ResourceLayout:
    """One ``ResourceSpans``: its resource message and its scopes."""

    resource: tuple[int, int] | None = None
    scopes: list[ScopeLayout] = field(default_factory=list)


@dataclass(slots=True)
class RequestLayout:
    """Where everything of an ``ExportTraceServiceRequest`` lies; spans in request order."""

    resources: list[ResourceLayout]
    spans: int
    largest_message: int  # the largest span or resource: what parsing one at a time holds at most


# Memory the layout holds per span (two 8-byte offsets) and per resource or scope (its objects).
LAYOUT_SPAN_BYTES = 16
LAYOUT_GROUP_BYTES = 512
# The layout asks for memory (``reserve``) in steps of this many bytes, or of this many spans.
LAYOUT_RESERVE_STEP = 1 << 16
LAYOUT_RESERVE_SPANS = 4096


def request_layout(body: Body, reserve: Callable[[int], None] | None = None) -> RequestLayout:
    """The layout of an ``ExportTraceServiceRequest`` body; raises ``WireFormatError`` when it is malformed.

    The layout's own memory is asked of ``reserve`` as it grows (which raises to stop a body of
    millions of empty spans or resources before it is held).
    """
    resources: list[ResourceLayout] = []
    spans = largest = owed = 0
    for number, start, end in length_delimited_fields(body, 0, len(body)):
        if number != 1:  # resource_spans; anything else is an unknown field
            continue
        resource = ResourceLayout()
        resources.append(resource)
        owed += LAYOUT_GROUP_BYTES
        for inner, inner_start, inner_end in length_delimited_fields(body, start, end):
            if inner == 1:
                resource.resource = (inner_start, inner_end)
                largest = max(largest, inner_end - inner_start)
            elif inner == 2:
                scope = ScopeLayout()
                resource.scopes.append(scope)
                owed += LAYOUT_GROUP_BYTES
                starts, ends = scope.starts, scope.ends
                for kind, span_start, span_end in length_delimited_fields(body, inner_start, inner_end):
                    if kind == 2:
                        starts.append(span_start)
                        ends.append(span_end)
                        if span_end - span_start > largest:
                            largest = span_end - span_start
                        if not len(starts) % LAYOUT_RESERVE_SPANS and reserve is not None:
                            reserve(owed + LAYOUT_SPAN_BYTES * LAYOUT_RESERVE_SPANS)
                            owed = 0
                    elif kind == 1:
                        scope.scope = (span_start, span_end)
                spans += len(starts)
                owed += LAYOUT_SPAN_BYTES * (len(starts) % LAYOUT_RESERVE_SPANS)
        if owed >= LAYOUT_RESERVE_STEP and reserve is not None:
            reserve(owed)
            owed = 0
    if reserve is not None:
        reserve(owed)
    return RequestLayout(resources, spans, largest)


def field_text(buf: Body, start: int, end: int, number: int) -> str | None:
    """The last string field ``number`` of the message in ``buf[start:end]`` (``UnicodeDecodeError`` if not UTF-8)."""
    text = None
    for found, value_start, value_end in length_delimited_fields(buf, start, end):
        if found == number:
            text = bytes(buf[value_start:value_end]).decode("utf-8")
    return text


# Message kind -> {field number: kind of the sub-message}; other length-delimited fields are strings
# or bytes. Only what a span, a resource or a key-value pair can contain.
_SUB_MESSAGES: dict[str, dict[int, str]] = {
    "span": {9: "kv", 11: "event", 13: "link", 15: "status"},
    "resource": {1: "kv", 3: "entity"},
    "kv": {2: "any"},
    "any": {5: "array", 6: "kvlist"},
    "array": {1: "any"},
    "kvlist": {1: "kv"},
    "event": {3: "kv"},
    "link": {4: "kv"},
    "status": {},
    "entity": {},
}


def parse_cost(buf: Body, start: int, end: int, kind: str, budget: int, exact: bool = False) -> int:
    """Parser bytes the message in ``buf[start:end]`` (a ``kind``, see ``_SUB_MESSAGES``) takes, at most.

    Small sub-messages count at their worst case (``exact``: they are costed too), large ones are
    costed the same way, recursively. Stops early, returning a figure above ``budget``, once the
    cost passes it.
    """
    cost = MESSAGE_BYTES
    children = _SUB_MESSAGES[kind]
    for number, value_start, value_end in length_delimited_fields(buf, start, end):
        size = value_end - value_start
        child = children.get(number)
        if child is None:
            cost += size
        elif size < SMALL_MESSAGE_BYTES and not exact:
            cost += MESSAGE_BYTES + size * DENSE_FACTOR
        else:
            cost += parse_cost(buf, value_start, value_end, child, budget - cost, exact)
        if cost > budget:
            break
    return cost


def check_parse_cost(buf: Body, start: int, end: int, kind: str) -> None:
    """Raise ``DenseMessageError`` when the message would take more parser memory than its budget."""
    size = end - start
    if size < SMALL_MESSAGE_BYTES:
        return
    budget = parse_budget(size)
    cost = parse_cost(buf, start, end, kind, budget)
    if cost > budget:
        raise DenseMessageError(
            f"its {size} bytes hold so many nested items that parsing them would take over {budget} bytes "
            "of memory (4x its size + 1 MiB)"
        )


def span_ids(body: Body, start: int, end: int) -> bytes:
    """trace_id (field 1) + span_id (field 2) of the span in ``body[start:end]``, read from the wire only.

    Empty when the span lacks either (it is rejected when parsed). Exporters write the ids first,
    so this reads two fields.
    """
    trace_id = span_id = b""
    try:
        for number, value_start, value_end in length_delimited_fields(body, start, end):
            if number == 1:
                trace_id = bytes(body[value_start:value_end])
            elif number == 2:
                span_id = bytes(body[value_start:value_end])
            if trace_id and span_id:
                break
    except WireFormatError:
        return b""
    return trace_id + span_id if len(trace_id) == 16 and len(span_id) == 8 else b""


def parse_span(body: Body, start: int, end: int) -> Span:
    """The span in ``body[start:end]``; raises ``DenseMessageError`` or protobuf's ``DecodeError``."""
    check_parse_cost(body, start, end, "span")
    span: Span = Span.FromString(memoryview(body)[start:end])
    return span


def parse_key_values(body: Body, start: int, end: int, limit: int | None) -> tuple[list[KeyValue], int]:
    """The first ``limit`` attributes (field 1) of the ``Resource`` in ``body[start:end]`` and how many were left out.

    Each is parsed on its own, so the attributes beyond the limit never reach the parser; together
    the kept ones may cost at most ``parse_budget`` of their size (each costed exactly first).
    Raises ``DenseMessageError`` or protobuf's ``DecodeError``.
    """
    kept: list[tuple[int, int]] = []
    dropped = 0
    for number, value_start, value_end in length_delimited_fields(body, start, end):
        if number != 1:
            continue
        if limit is not None and len(kept) >= limit:
            dropped += 1
        else:
            kept.append((value_start, value_end))
    budget = parse_budget(sum(value_end - value_start for value_start, value_end in kept))
    cost = 0
    for value_start, value_end in kept:
        cost += parse_cost(body, value_start, value_end, "kv", budget - cost, exact=True)
        if cost > budget:
            raise DenseMessageError(
                f"its first {len(kept)} attributes hold so many nested items that parsing them would take over "
                f"{budget} bytes of memory"
            )
    view = memoryview(body)
    return [KeyValue.FromString(view[value_start:value_end]) for value_start, value_end in kept], dropped

