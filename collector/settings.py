"""Capture settings: where and how spans are written, read from their ``TRACELEARN_*`` declarations in
``tracelearn.settings`` (OTel exporters take no arguments)."""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tracelearn.settings.variables import COMPRESSION, DATA_ROOT, MAX_ATTRIBUTE_BYTES, ROLL_BYTES, ROLL_SECONDS


@dataclass(frozen=True)
class CaptureSettings:
    """Where and how spans are written."""

    data_root: Path
    roll_bytes: int
    roll_seconds: float
    compression: str
    max_attribute_bytes: int

    @property
    def spans_root(self) -> Path:
        return self.data_root / "spans"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "CaptureSettings":
        """The settings in ``env`` (default: ``os.environ``); ``SettingError`` names a bad value."""
        return cls(
            data_root=DATA_ROOT.value(env),
            roll_bytes=ROLL_BYTES.value(env),
            roll_seconds=ROLL_SECONDS.value(env),
            compression=COMPRESSION.value(env),
            max_attribute_bytes=MAX_ATTRIBUTE_BYTES.value(env),
        )
