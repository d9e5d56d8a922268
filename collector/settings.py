"""Capture settings, read from ``TRACELEARN_*`` environment variables (OTel exporters take no arguments).

Each variable is documented in the README's table; ``ENV_VARS`` is the source of that table.
"""

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VARS: dict[str, tuple[str, str]] = {
    "TRACELEARN_DATA": ("./data", "Root of the dataset; spans land under `<root>/spans/`."),
    "TRACELEARN_ROLL_BYTES": ("67108864", "Roll a spans file when its buffered rows reach this many bytes."),
    "TRACELEARN_ROLL_SECONDS": ("60", "Roll a spans file when its oldest buffered span is this old."),
    "TRACELEARN_COMPRESSION": ("zstd", "Parquet compression: zstd, snappy, gzip, lz4, brotli or none."),
    "TRACELEARN_MAX_ATTRIBUTE_BYTES": ("8388608", "Attribute values longer than this are truncated (and counted)."),
    "TRACELEARN_QUEUE_SIZE": ("65536", "Span queue bound of our batch processor (never drops silently)."),
    "TRACELEARN_QUEUE_BLOCK_MS": (
        "200",
        "How long a full queue blocks the agent before a span is dropped and counted.",
    ),
    "TRACELEARN_TOKEN_IDS": (
        "auto",
        "Ask OpenAI-compatible servers for token ids and logprobs: on, off, "
        "or auto (loopback and private addresses only).",
    ),
    "TRACELEARN_MODEL_CACHE": ("~/.cache/tracelearn/models", "Where the default model is unpacked at setup."),
}

COMPRESSIONS = frozenset({"zstd", "snappy", "gzip", "lz4", "brotli", "none"})


class SettingsError(ValueError):
    """A ``TRACELEARN_*`` variable has a value that cannot be used."""


def _positive_number(name: str, env: dict[str, str]) -> float:
    raw = env.get(name, ENV_VARS[name][0])
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


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
    def from_env(cls, env: dict[str, str] | None = None) -> "CaptureSettings":
        values = dict(os.environ if env is None else env)
        compression = values.get("TRACELEARN_COMPRESSION", ENV_VARS["TRACELEARN_COMPRESSION"][0]).lower()
        if compression not in COMPRESSIONS:
            raise SettingsError(
                f"TRACELEARN_COMPRESSION={compression!r}; choose one of {', '.join(sorted(COMPRESSIONS))}"
            )
        return cls(
            data_root=Path(values.get("TRACELEARN_DATA", ENV_VARS["TRACELEARN_DATA"][0])).expanduser(),
            roll_bytes=int(_positive_number("TRACELEARN_ROLL_BYTES", values)),
            roll_seconds=_positive_number("TRACELEARN_ROLL_SECONDS", values),
            compression=compression,
            max_attribute_bytes=int(_positive_number("TRACELEARN_MAX_ATTRIBUTE_BYTES", values)),
        )
