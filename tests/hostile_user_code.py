"""Reward functions and stages that misbehave as careless or hostile user code does.

Pipeline configs name them by import path (``hostile_user_code:misbehave``). The reward function reads
what to do from the rollout's ``tracelearn.metadata.behaviour``; a call that hangs first writes its
process id to ``$HOSTILE_PID_DIR`` so a test can check that the process was stopped.
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl


def _note_pid() -> None:
    directory = os.environ.get("HOSTILE_PID_DIR")
    if directory:
        (Path(directory) / str(os.getpid())).write_text("")


def misbehave(answer: str, behaviour: str) -> float:
    """``ok``: 1.0; ``print``: prints, then 0.5; ``sleep``/``spin``: hangs (asleep, or busy in Python);
    ``exit``: ``sys.exit(3)``; ``interrupt``: raises ``KeyboardInterrupt``; ``os_exit``: ends the process."""
    if behaviour == "print":
        print(f"grading {answer!r}")
        return 0.5
    if behaviour == "sleep":
        _note_pid()
        time.sleep(3600)
    if behaviour == "spin":
        _note_pid()
        while True:
            pass
    if behaviour == "exit":
        sys.exit(3)
    if behaviour == "interrupt":
        raise KeyboardInterrupt
    if behaviour == "os_exit":
        os._exit(7)
    return 1.0


def always_hangs(answer: str) -> float:
    """A grader whose backend is down: every call hangs."""
    _note_pid()
    time.sleep(3600)
    return 0.0


def maps_are_dicts(spans: list[dict[str, Any]]) -> float:
    """Checks that every map of every span (attributes, resource attributes, those of events and links)
    arrives as a dict; returns the number of event attributes."""
    for span in spans:
        maps = [span["attributes"], span["resource_attributes"]]
        maps += [item["attributes"] for item in (span["events"] or []) + (span["links"] or [])]
        if not all(isinstance(value, dict) for value in maps):
            raise TypeError(f"span {span['span_id']}: a map is not a dict: {maps}")
    return float(sum(len(event["attributes"]) for span in spans for event in span["events"] or []))


def hanging_stage(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A stage that never returns."""
    time.sleep(3600)
    return lf


def exiting_stage(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A stage that calls ``sys.exit(3)``."""
    sys.exit(3)
