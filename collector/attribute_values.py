"""Attribute values read into the spans table's column values: text, integers, floats, token-id and
logprob lists.

Tolerant: a value of the wrong type or out of a column's range yields ``None``, never an exception (one
span's odd attribute must not fail the batch it is written in). Exact-type tests come first: these run
for every column of every captured span.
"""

import math
from collections.abc import Sequence
from typing import Any

from tracelearn.schemas import messages as mc


def attribute_text(value: Any) -> str:
    """An attribute value as the text stored in the spans table: strings as-is, the rest as JSON."""
    if isinstance(value, str):
        return value
    # Exact scalar types next, written as the JSON encoder writes them: this runs for every
    # attribute of every captured span.
    kind = type(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    return mc.compact_json(value)


def str_or_none(value: Any) -> str | None:
    """A text column's value: strings as-is, other values as attribute text, ``None`` stays ``None``."""
    if value is None or type(value) is str:
        return value
    return value if isinstance(value, str) else attribute_text(value)


def first_of(value: Any) -> str | None:
    """First element of a sequence attribute (finish reasons), or the value itself if a string."""
    if type(value) is tuple or type(value) is list:
        return str(value[0]) if value else None
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value:
        return str(value[0])
    return None


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def as_int(value: Any) -> int | None:
    """An integer attribute, tolerating floats and numeric strings; ``None`` when not a number or
    beyond the int64 columns (one span's value must not fail the whole batch it is written in)."""
    if value is None or isinstance(value, bool):
        return None
    if type(value) is not int:
        if isinstance(value, float) and math.isfinite(value):
            value = int(value)
        elif isinstance(value, str):
            try:
                value = int(value)
            except ValueError:  # not an integer (or more digits than Python converts)
                return None
        elif not isinstance(value, int):
            return None
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def as_float(value: Any) -> float | None:
    """A float attribute, tolerating ints and numeric strings; ``None`` when not a number."""
    if value is None or type(value) is float:
        return value
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | str):
        try:
            return float(value)
        except (ValueError, OverflowError):  # not a number, or an integer beyond a float's range
            return None
    return None


_INT_TYPES = frozenset({int})
_FLOAT_TYPES = frozenset({float})


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def int_list(value: Any) -> list[int] | None:
    """A token-id list attribute (a sequence of ints, or JSON text of one); None unless every id fits
    the column's int32 (one span's out-of-range ids must not fail the whole batch it is written in).
    """
    if isinstance(value, str):
        try:
            value = mc.parse_json(value)
        except ValueError:
            return None
    if type(value) in (tuple, list) and set(map(type, value)) <= _INT_TYPES:
        ids = list(value)  # the common case (hundreds of ids per span), checked at C speed
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        ids = list(value)
    else:
        return None
    return ids if not ids or (min(ids) >= _INT32_MIN and max(ids) <= _INT32_MAX) else None


def float_list(value: Any) -> list[float] | None:
    """A logprob list attribute (a sequence of numbers, or JSON text of one)."""
    if isinstance(value, str):
        try:
            value = mc.parse_json(value)
        except ValueError:
            return None
    if type(value) in (tuple, list) and set(map(type, value)) <= _FLOAT_TYPES:
        return list(value)  # the common case, checked at C speed; ``float(v)`` of a float is ``v``
    if isinstance(value, Sequence) and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    return None
