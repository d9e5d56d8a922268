"""``Setting``: one ``TRACELEARN_*`` environment variable, declared once and read through its declaration.

A setting has a name, a type (how its text is read), a default (``None``: unset), a meaning and the
part that reads it. An empty value counts as unset. ``value`` reads and checks it, raising
``SettingError`` that names the variable, its value and what it must be; each reader decides what a
bad value means there (the capture path logs it and goes on without capture, a DAG file fails to
import, the CLI prints it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class SettingError(ValueError):
    """A ``TRACELEARN_*`` variable has a value that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Kind(Generic[T]):
    """How a setting's text becomes its value: ``read`` raises ``ValueError`` with the reason."""

    name: str  # as the settings table shows it
    read: Callable[[str], T]


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number") from None
    if not math.isfinite(value):
        raise ValueError("is not a number")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _positive_count(text: str) -> int:
    return int(_positive_number(text))


def _minutes(text: str) -> float:
    try:
        return _positive_number(text)
    except ValueError:
        raise ValueError("is not a number of minutes > 0") from None


def choice(*options: str) -> Kind[str]:
    """One of ``options``, case-insensitive (the value is lower case)."""

    def read(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"is not one of {', '.join(options)}")
        return value

    return Kind(" / ".join(options), read)


CRON_PRESETS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#-]+")


def _cron(text: str) -> str:
    """A cron expression (five fields, or a preset such as ``@hourly``), or ``off``; the syntax only: the
    scheduler reads the fields."""
    value = " ".join(text.split())
    if value.lower() == "off" or value.lower() in CRON_PRESETS:
        return value.lower()
    fields = value.split(" ")
    if len(fields) != 5 or not all(CRON_FIELD.fullmatch(field) for field in fields):
        raise ValueError(f"is not a cron expression (five fields, or {', '.join(CRON_PRESETS)}) or off")
    return value


TEXT: Kind[str] = Kind("text", str)
PATH: Kind[Path] = Kind("path", lambda text: Path(text).expanduser())
# A path or a URI (``s3://...``, ``mlflow+http://...``): ``~`` is expanded, anything else kept as written.
LOCATION: Kind[str] = Kind("path or URI", lambda text: str(Path(text).expanduser()) if text.startswith("~") else text)
POSITIVE_NUMBER: Kind[float] = Kind("number > 0", _positive_number)
POSITIVE_COUNT: Kind[int] = Kind("integer > 0", _positive_count)
MINUTES: Kind[float] = Kind("minutes > 0", _minutes)
CRON: Kind[str] = Kind("cron expression or off", _cron)


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One ``TRACELEARN_*`` variable (see the module docstring)."""

    name: str
    kind: Kind[T]
    default: str | None
    meaning: str
    read_by: str

    def text(self, env: Mapping[str, str] | None = None) -> str | None:
        """The variable's text in ``env`` (default: ``os.environ``), else the default (``None``: unset)."""
        raw = (os.environ if env is None else env).get(self.name)
        return raw if raw else self.default

    def is_set(self, env: Mapping[str, str] | None = None) -> bool:
        return bool((os.environ if env is None else env).get(self.name))

    def value(self, env: Mapping[str, str] | None = None) -> T:
        """The checked value; ``SettingError`` for a bad value, or for an unset one without a default."""
        text = self.text(env)
        if text is None:
            raise SettingError(f"{self.name} is not set: {self.meaning}")
        return self._read(text)

    def optional(self, env: Mapping[str, str] | None = None) -> T | None:
        """The checked value, or ``None`` when unset and without a default."""
        text = self.text(env)
        return None if text is None else self._read(text)

    def default_value(self) -> T:
        """The default, read as a value (for readers that fall back to it on a bad value)."""
        if self.default is None:
            raise SettingError(f"{self.name} has no default")
        return self.kind.read(self.default)

    def _read(self, text: str) -> T:
        try:
            return self.kind.read(text)
        except ValueError as error:
            raise SettingError(f"{self.name}={text!r} {error}") from None
