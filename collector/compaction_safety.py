"""What makes a compaction crash-safe: the partition's lock, the journal of each output, and recovery.

A compaction of one ``date=D/service=S`` directory holds ``_compaction.lock`` (created with
O_EXCL; taken over when the process that holds it, on this host, is gone), writes a journal
``_compaction-<id>-<n>.json`` naming an output and its inputs before the output is renamed in, and
deletes the journal once the inputs are gone. ``recover_partition`` finishes what a crash left: a
journal whose output exists has its remaining inputs deleted (roll forward), one whose output does
not has its temp file deleted (roll back). ``superseded_inputs`` tells a reader which listed files
an output already holds. See ``compaction`` for the whole protocol.

May import: tracelearn.storage, the standard library.
"""

import contextlib
import datetime as dt
import enum
import json
import os
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tracelearn.storage.atomic_files import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    fsync_directory,
    local_host,
    process_gone,
    write_bytes_atomically,
)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
LOCK_NAME = "_compaction.lock"
JOURNAL_PREFIX = "_compaction-"
JOURNAL_SUFFIX = ".json"
JOURNAL_FORMAT = 1
WRITER_ID_PREFIX = "compact"
# Journal temps and the stale locks being taken over: a dot prefix like every temp file, and a name
# of their own, so nothing but compaction ever matches them.
COMPACTION_TEMP_PREFIX = f"{TEMP_PREFIX}compaction-"

# Lock tokens held in this process: a lock naming this pid but another token was left by an earlier
# process that had the same pid (a restarted container's command is often pid 1).
_HELD_TOKENS: set[str] = set()


class CompactionError(Exception):
    """Compaction cannot run as asked (no such data, a bad date, a broken journal)."""


class CompactionLockedError(CompactionError):
    """Another compaction of the partition holds its lock."""


class CompactionConflictError(CompactionError):
    """Someone else changed the partition's inputs or lock during the run; that output was rolled back."""


class Step(enum.StrEnum):
    """The points of a run that ``on_event`` hears about, in the order they happen per output."""

    PLANNED = "planned"  # path: the partition; nbytes: what the run will read there
    INPUT_READ = "input read"  # path: the input; nbytes: its size on disk
    OUTPUT_WRITTEN = "output written"  # path: the temp file, every row in it, not yet renamed
    JOURNAL_WRITTEN = "journal written"  # path: the journal
    OUTPUT_RENAMED = "output renamed"  # path: the output, now visible next to its inputs
    INPUT_DELETED = "input deleted"  # path: the deleted input


@dataclass(frozen=True)
class CompactionEvent:
    step: Step
    path: Path
    nbytes: int = 0


EventListener = Callable[[CompactionEvent], None]


def ignore_event(event: CompactionEvent) -> None:
    """The listener of a run nobody watches."""



# --- The lock ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    token: str
    since: str


def read_lock(path: Path) -> LockHolder | None:
    """Who holds the lock at ``path`` (``None``: nobody); raises ``CompactionLockedError`` when it names no one.

    A lock without a readable holder is being written right now (O_EXCL creates it empty), or was
    left so by a crash in that instant: only a person can tell which.
    """
    try:
        fields = json.loads(path.read_text())
        return LockHolder(str(fields["host"]), int(fields["pid"]), str(fields["token"]), str(fields["since"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        if path.exists():
            raise CompactionLockedError(
                f"{path}: lock file without a readable holder (being taken right now, or left empty by a crash); "
                "if no compaction of this partition runs, delete it"
            ) from None
        return None


def lock_is_stale(holder: LockHolder) -> bool:
    """Whether the holder has exited; a holder on another host cannot be checked, so it is not stale."""
    if holder.host != local_host():
        return False
    if holder.pid == os.getpid():
        return holder.token not in _HELD_TOKENS
    return process_gone(holder.pid)


def locked_message(path: Path, holder: LockHolder) -> str:
    if holder.host == local_host():
        return (
            f"{path}: a compaction of this partition is running (pid {holder.pid}, since {holder.since}); wait for it"
        )
    return (
        f"{path}: held by pid {holder.pid} on host {holder.host} since {holder.since}, which this host cannot check; "
        "if no compaction runs there, delete the lock file"
    )


def _create_lock(path: Path, ours: LockHolder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"host": ours.host, "pid": ours.pid, "token": ours.token, "since": ours.since}, handle)
    return True


def _take_over_stale(path: Path, stale: LockHolder, ours: LockHolder) -> None:
    """Remove the lock if it is still ``stale``'s; a lock taken meanwhile by a live process stays."""
    aside = path.parent / f"{COMPACTION_TEMP_PREFIX}stale-lock-{ours.token}"
    try:
        path.rename(aside)  # exactly one process moves a given lock file away
    except FileNotFoundError:
        return
    try:
        moved = read_lock(aside)
        still_stale = moved is None or moved.token == stale.token
    except CompactionLockedError:  # a lock being written by the process that just created it
        moved, still_stale = None, False
    if not still_stale:
        # Another process took the lock between our read and our rename: give it back.
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        raise CompactionLockedError(
            locked_message(path, moved) if moved else f"{path}: just taken by another compaction"
        )
    aside.unlink(missing_ok=True)


def acquire_lock(directory: Path) -> LockHolder:
    """Hold the partition's lock, taking over one whose process on this host is gone."""
    path = directory / LOCK_NAME
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    ours = LockHolder(local_host(), os.getpid(), uuid.uuid4().hex, now)
    for _ in range(3):  # another try only after a stale lock was removed
        if _create_lock(path, ours):
            _HELD_TOKENS.add(ours.token)
            return ours
        holder = read_lock(path)
        if holder is None:
            continue  # released meanwhile
        if not lock_is_stale(holder):
            raise CompactionLockedError(locked_message(path, holder))
        _take_over_stale(path, holder, ours)
    raise CompactionLockedError(f"{path}: the lock keeps changing hands; try again")


def lock_still_held(directory: Path, ours: LockHolder) -> bool:
    holder = read_lock(directory / LOCK_NAME)
    return holder is not None and holder.token == ours.token


def release_lock(directory: Path, ours: LockHolder) -> None:
    """Delete the lock if it is still ours."""
    _HELD_TOKENS.discard(ours.token)
    with contextlib.suppress(CompactionLockedError):
        if lock_still_held(directory, ours):
            (directory / LOCK_NAME).unlink(missing_ok=True)


@contextlib.contextmanager
def partition_lock(directory: Path) -> Iterator[LockHolder]:
    ours = acquire_lock(directory)
    try:
        yield ours
    finally:
        release_lock(directory, ours)


# --- Journals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Journal:
    """One output's commit record: while it exists, ``output`` may be visible next to ``inputs``."""

    path: Path
    output: str
    inputs: tuple[str, ...]


def write_journal(path: Path, output: str, inputs: Sequence[Path]) -> None:
    """Write the journal ``path`` atomically (temp, fsync, rename, directory fsync)."""
    payload = {
        "format": JOURNAL_FORMAT,
        "output": output,
        "inputs": [item.name for item in inputs],
        "host": local_host(),
        "pid": os.getpid(),
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_bytes_atomically(path, json.dumps(payload).encode(), path.parent / f"{COMPACTION_TEMP_PREFIX}{path.name}.tmp")


def read_journals(directory: Path) -> list[Journal]:
    """The journals in ``directory``; raises ``CompactionError`` naming one that cannot be understood."""
    journals = []
    for path in sorted(directory.glob(f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}")):
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # its compaction just finished
        except ValueError as exc:
            raise CompactionError(f"{path}: not a compaction journal ({exc}); nothing was changed") from None
        names = _journal_names(payload)
        if names is None:
            raise CompactionError(f"{path}: not a compaction journal of format {JOURNAL_FORMAT}; nothing was changed")
        output, inputs = names
        for name in [output, *inputs]:
            if Path(name).name != name or not name.startswith(PART_PREFIX):
                raise CompactionError(f"{path}: names {name!r}, not a part file of this directory")
        journals.append(Journal(path, output, inputs))
    return journals


def _journal_names(payload: object) -> tuple[str, tuple[str, ...]] | None:
    """(output, inputs) of a parsed journal, ``None`` when it is not one of this format."""
    if not isinstance(payload, dict) or payload.get("format") != JOURNAL_FORMAT:
        return None
    output, inputs = payload.get("output"), payload.get("inputs")
    if not isinstance(output, str) or not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        return None
    return output, tuple(inputs)


def superseded_inputs(directory: Path, listed: Collection[str]) -> set[str]:
    """Names in ``listed`` (one listing of ``directory``) whose rows a listed compaction output holds.

    For a reader that does not de-duplicate: list the directory, drop these names, read the rest. An
    input is dropped only when its output is in the same listing; if the journal is gone by the time
    it is read, its inputs are gone too, and opening one raises ``FileNotFoundError``: list again.
    """
    present = set(listed)
    superseded = {name for journal in read_journals(directory) if journal.output in present for name in journal.inputs}
    return superseded & present


def delete_inputs(directory: Path, names: Sequence[str], on_event: EventListener) -> None:
    for name in names:
        path = directory / name
        path.unlink(missing_ok=True)
        on_event(CompactionEvent(Step.INPUT_DELETED, path))
    fsync_directory(directory)


def _output_temp_files(directory: Path, output: str | None = None) -> list[Path]:
    """Temp files of compaction outputs (of ``output`` only, if given)."""
    stem = output.removesuffix(PART_SUFFIX) if output else f"{PART_PREFIX}*-{WRITER_ID_PREFIX}*"
    return sorted(directory.glob(f"{TEMP_PREFIX}{stem}-*{TEMP_SUFFIX}"))


def recover_partition(directory: Path) -> list[str]:
    """Finish (output present) or roll back (output absent) every journal; call with the lock held.

    Also deletes the temp files of compactions that died before writing a journal: with the lock
    held, no other compaction of this partition is running. Returns what was done, one line each.
    """
    done = []
    for journal in read_journals(directory):
        if (directory / journal.output).exists():
            remaining = [name for name in journal.inputs if (directory / name).exists()]
            delete_inputs(directory, remaining, ignore_event)
            done.append(f"finished {journal.output}: deleted {len(remaining)} remaining inputs")
        else:
            for temp in _output_temp_files(directory, journal.output):
                temp.unlink(missing_ok=True)
            done.append(f"rolled back {journal.output}: its {len(journal.inputs)} inputs stay")
        journal.path.unlink(missing_ok=True)
        fsync_directory(directory)
    leftovers = _output_temp_files(directory) + sorted(directory.glob(f"{COMPACTION_TEMP_PREFIX}{JOURNAL_PREFIX}*"))
    for temp in leftovers:
        temp.unlink(missing_ok=True)
        done.append(f"deleted {temp.name}, left by an interrupted compaction")
    return done
