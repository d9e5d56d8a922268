"""De-duplication of client retries by (trace_id, span_id): the recent keys, in memory and on disk.

An OTLP client that got no answer (a timeout, a restart of the collector) sends the same request
again. The group committer drops spans whose key it committed recently and acknowledges them
without writing them twice. The window holds the keys of at least the last ``capacity // 2`` and at
most ``capacity`` committed spans.

The window survives restarts: when a request log segment has become Parquet files, its keys are
appended (and fsynced) to ``<spool>/dedup-<generation>.keys`` before the segment is deleted, and a
starting collector loads those files, then adds the keys of the segments it replays. So a retry is
recognized across a SIGTERM and across a ``kill -9``, as long as the first delivery is among the
last ``capacity // 2`` spans committed. The files rotate like the window (two generations of
``capacity // 2`` keys, 24 bytes each: 12 MB for the default 500,000).

May import: tracelearn.storage, the standard library.
"""

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tracelearn.storage.atomic_files import fsync_directory

logger = logging.getLogger(__name__)

KEY_BYTES = 24  # trace_id (16) + span_id (8)
DEFAULT_DEDUP_WINDOW = 500_000
INDEX_PREFIX = "dedup-"
INDEX_SUFFIX = ".keys"


class RecentSpanKeys:
    """The keys of the last ``capacity`` (at least half of it) committed spans, in two generations of sets.

    When the current set holds ``capacity // 2`` keys it becomes the old one and the previous old one
    is dropped, so eviction is one step and no per-key queue is kept. Used by one thread at a time.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._generation_size = max(capacity // 2, 1)
        self._current: set[bytes] = set()
        self._previous: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def __contains__(self, key: bytes) -> bool:
        return key in self._current or key in self._previous

    def isdisjoint(self, keys: Iterable[bytes]) -> bool:
        return self._current.isdisjoint(keys) and self._previous.isdisjoint(keys)

    def add_all(self, keys: Iterable[bytes]) -> None:
        if self.capacity <= 0:
            return
        self._current.update(keys)
        if len(self._current) >= self._generation_size:
            self._previous, self._current = self._current, set()


def new_positions(keys: Sequence[bytes], recent: RecentSpanKeys, earlier: set[bytes]) -> list[int] | None:
    """Positions of ``keys`` neither recent, in ``earlier`` (this group), nor repeated; ``None``: all of them.

    Adds the kept keys to ``earlier``. The common case, nothing seen before, costs three C-level set
    operations and no Python loop.
    """
    if recent.isdisjoint(keys) and earlier.isdisjoint(keys):
        before = len(earlier)
        earlier.update(keys)
        if len(earlier) - before == len(keys):
            return None
        for key in keys:  # repeated within the request itself: undo and take the slow path
            earlier.discard(key)
    kept = []
    for position, key in enumerate(keys):
        if key not in recent and key not in earlier:
            earlier.add(key)
            kept.append(position)
    return kept


class KeyIndex:
    """The window's keys on disk, appended as segments land in Parquet; read back at start.

    Thread-safe by its single user (the conversion thread); ``capacity`` 0 keeps nothing.
    """

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self._generation_size = max(capacity // 2, 1)
        self._generation = 0
        self._count = 0  # keys in the current generation's file

    def _path(self, generation: int) -> Path:
        return self.directory / f"{INDEX_PREFIX}{generation:012d}{INDEX_SUFFIX}"

    def _generations(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}"):
            number = path.name.removeprefix(INDEX_PREFIX).removesuffix(INDEX_SUFFIX)
            if number.isdigit():
                found.append(int(number))
        return sorted(found)

    def load(self) -> list[bytes]:
        """The keys of the last two generations, oldest first; older files are deleted."""
        if self.capacity <= 0:
            return []
        generations = self._generations()
        for old in generations[:-2]:
            self._path(old).unlink(missing_ok=True)
        keys: list[bytes] = []
        for generation in generations[-2:]:
            try:
                data = self._path(generation).read_bytes()
            except OSError as exc:
                logger.warning("tracelearn collector: cannot read the de-duplication index %s: %s",
                               self._path(generation), exc)
                continue
            whole = len(data) - len(data) % KEY_BYTES  # a torn last key was never fsynced: ignored
            keys.extend(data[i : i + KEY_BYTES] for i in range(0, whole, KEY_BYTES))
            self._generation, self._count = generation, whole // KEY_BYTES
        return keys

    def append(self, keys: bytes) -> None:
        """Append ``keys`` (``KEY_BYTES`` each) to the current generation and fsync; a full one starts the next."""
        if self.capacity <= 0 or not keys:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(self._generation)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            data = memoryview(keys)
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.directory)
        self._count += len(keys) // KEY_BYTES
        if self._count >= self._generation_size:
            self._generation += 1
            self._count = 0
            with contextlib.suppress(OSError):
                self._path(self._generation - 2).unlink(missing_ok=True)
