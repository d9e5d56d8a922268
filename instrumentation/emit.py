"""The emit API: rewards, annotations and messages recorded as small spans of the current rollout.

Each call creates one short span, a child of the current span, so it carries the rollout identity and
travels through whichever exporter the process uses (our Parquet exporter or OTLP to a sidecar).
"""

import logging
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from opentelemetry import trace

from tracelearn.schemas import semconv as sc

logger = logging.getLogger(__name__)


def _tracer() -> trace.Tracer:
    # Looked up per call: a module-level proxy tracer would stay bound to the first provider it saw.
    return trace.get_tracer("tracelearn")


DEFAULT_REWARD_NAME = "reward"
AttributeValue = str | bool | int | float


def _reward_items(value: float | Mapping[str, float]) -> list[tuple[str, float]]:
    if isinstance(value, Mapping):
        items = list(value.items())
        if not items:
            raise ValueError("emit_reward got an empty mapping; give at least one named reward")
    else:
        items = [(DEFAULT_REWARD_NAME, value)]
    checked: list[tuple[str, float]] = []
    for name, reward in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"reward names must be non-empty strings, got {name!r}")
        if isinstance(reward, bool) or not isinstance(reward, Real):
            raise TypeError(f"reward {name!r} must be a number, got {type(reward).__name__}")
        checked.append((name, float(reward)))
    return checked


def emit_reward(value: float | Mapping[str, float], primary: str | None = None) -> None:
    """Record a reward for the current rollout: a number, or several named numbers.

    ``emit_reward(1.0)`` records the reward ``reward``; ``emit_reward({"correct": 1, "short": 0.2},
    primary="correct")`` records two, the primary one being ``primary`` (default: the first).
    Non-finite values are not recorded (a warning is logged); wrong types raise ``TypeError``.
    """
    items = _reward_items(value)
    names = [name for name, _ in items]
    if primary is not None and primary not in names:
        raise ValueError(f"primary reward {primary!r} is not among the emitted names {names}")
    primary_name = primary or names[0]
    for name, reward in items:
        if not math.isfinite(reward):
            logger.warning("tracelearn: reward %r is %s; not recorded", name, reward)
            continue
        with _tracer().start_as_current_span(
            sc.SPAN_REWARD,
            attributes={
                sc.SPAN_TYPE: sc.TYPE_REWARD,
                sc.REWARD_NAME: name,
                sc.REWARD_VALUE: reward,
                sc.REWARD_PRIMARY: name == primary_name,
            },
        ):
            pass


def _attribute_value(value: Any) -> AttributeValue:
    return value if isinstance(value, str | bool | int | float) else str(value)


def emit_annotation(name: str, value: Any = True, **attributes: Any) -> None:
    """Record a named annotation (a label, a score, a note) on the current rollout."""
    extra = {f"{sc.METADATA_PREFIX}{key}": _attribute_value(v) for key, v in attributes.items()}
    with _tracer().start_as_current_span(
        sc.SPAN_ANNOTATION,
        attributes={
            sc.SPAN_TYPE: sc.TYPE_ANNOTATION,
            sc.ANNOTATION_NAME: name,
            sc.ANNOTATION_VALUE: _attribute_value(value),
            **extra,
        },
    ):
        pass


def emit_message(role: str, content: str) -> None:
    """Record a message (for example the final answer shown to a user) on the current rollout."""
    with _tracer().start_as_current_span(
        sc.SPAN_MESSAGE,
        attributes={sc.SPAN_TYPE: sc.TYPE_MESSAGE, sc.MESSAGE_ROLE: role, sc.MESSAGE_CONTENT: content},
    ):
        pass
