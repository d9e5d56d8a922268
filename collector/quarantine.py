"""Where acknowledged spans go when they cannot land in the dataset, each with the reason.

An acknowledged span is never dropped: when its rows cannot be written where they belong (a
partition directory that refuses them), when it cannot be converted (a value the row builder
rejects), or when a spool segment cannot be read to its end, what could not land is set aside under
``<spans root>/_quarantine/`` (the leading underscore keeps dataset readers out) as

- ``<name>.parquet``: rows that were converted but could not be written in their partition;
- ``<name>.otlp`` / ``<name>.json-otlp``: an acknowledged request body (protobuf / OTLP/JSON), to
  be resent once the cause is fixed (``curl --data-binary @FILE -H 'Content-Type: ...'``);
- ``<name>.bytes``: the unreadable rest of a spool segment; ``<name>.arrows`` / ``.otlp``: a
  whole segment that cannot be read (an unknown format, rows that do not fit the table);

each with ``<name>.reason.json``: what it holds (spans, positions), where it came from and why it is
here. Names are fixed by the source (segment and partition or record), so a replay after a crash
writes the same names and never sets anything aside twice. Writing an entry can itself fail
(``OSError``): the caller then keeps the source and retries, as for a full disk.

May import: tracelearn.storage, pyarrow, orjson.
"""

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from tracelearn.storage.atomic_files import fsync_directory, write_bytes_atomically
from tracelearn.storage.atomic_parquet import write_parquet_atomically

QUARANTINE_DIR = "_quarantine"
REASON_SUFFIX = ".reason.json"
BODY_SUFFIXES = {"application/x-protobuf": ".otlp", "application/json": ".json-otlp"}


def entry_name(*parts: str) -> str:
    """A file name (without suffix) for an entry from ``parts`` (a segment stem, a partition, ...)."""
    readable = "-".join(part for part in parts if part)[:120]
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in readable) + f"-{digest}"


def _write_bytes_atomically(path: Path, data: bytes | bytearray) -> None:
    write_bytes_atomically(path, data, path.with_name(f".tmp-{path.name}-{os.getpid()}"))


@dataclass(frozen=True)
class QuarantineSummary:
    """What the quarantine directory holds now."""

    entries: int
    spans: int
    bytes: int


class Quarantine:
    """The quarantine directory of one spans dataset."""

    def __init__(self, spans_root: Path) -> None:
        self.directory = spans_root / QUARANTINE_DIR

    def _reason_path(self, name: str) -> Path:
        return self.directory / f"{name}{REASON_SUFFIX}"

    def holds(self, name: str) -> bool:
        """Whether entry ``name`` is complete (its reason file is written last)."""
        return self._reason_path(name).exists()

    def _record(self, name: str, payload: Path, spans: int, reason: str, source: str, extra: dict[str, Any]) -> None:
        details = {"file": payload.name, "spans": spans, "reason": reason, "source": source,
                   "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        _write_bytes_atomically(self._reason_path(name), orjson.dumps(details, option=orjson.OPT_INDENT_2))

    def rows(self, name: str, table: pa.Table, compression: str, reason: str, source: str) -> bool:
        """Set aside rows that could not be written in their partition; ``False`` if already there."""
        if self.holds(name):
            return False
        path = write_parquet_atomically(table, self.directory, f"{name}.parquet", compression)
        self._record(name, path, table.num_rows, reason, source, {})
        return True

    def request(
        self,
        name: str,
        body: bytes | bytearray,
        media_type: str,
        positions: Sequence[int],
        reasons: Sequence[str],
        source: str,
    ) -> bool:
        """Set aside an acknowledged request body of which the spans at ``positions`` could not be converted."""
        if self.holds(name):
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}{BODY_SUFFIXES.get(media_type, '.body')}"
        _write_bytes_atomically(path, body)
        reason = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        self._record(name, path, len(positions), reason, source,
                     {"content_type": media_type, "positions": list(positions)})
        return True

    def raw_bytes(self, name: str, data: bytes, reason: str, source: str) -> bool:
        """Set aside bytes that could not be read as records (the damaged rest of a segment)."""
        if self.holds(name):
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.bytes"
        _write_bytes_atomically(path, data)
        self._record(name, path, 0, reason, source, {"bytes": len(data)})
        return True

    def segment(self, name: str, path: Path, reason: str, source: str) -> None:
        """Move a whole spool segment that cannot be read here (its reason is written first)."""
        target = self.directory / f"{name}{path.suffix}"
        if not self.holds(name):
            self.directory.mkdir(parents=True, exist_ok=True)
            self._record(name, target, 0, reason, source, {"bytes": path.stat().st_size})
        path.replace(target)
        fsync_directory(self.directory)

    def summary(self) -> QuarantineSummary:
        """Entries, spans and bytes in the quarantine directory (read from the reason files)."""
        entries = spans = size = 0
        if not self.directory.is_dir():
            return QuarantineSummary(0, 0, 0)
        for reason in self.directory.glob(f"*{REASON_SUFFIX}"):
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                details = orjson.loads(reason.read_bytes())
                entries += 1
                spans += int(details.get("spans", 0))
                size += (self.directory / str(details.get("file", ""))).stat().st_size
        return QuarantineSummary(entries, spans, size)
