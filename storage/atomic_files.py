"""Files that appear complete or not at all, and the names that say which process wrote them.

Owns: the directory fsync that makes a rename durable, hive partition paths and the path segments
in them, the writer identity carried in temp file names (host, pid), the check that a writer process
has exited, and the removal of temp files such a writer left behind. ``atomic_parquet`` writes
Parquet files on top of these; nothing here buffers rows. Standard library only.
"""

import errno
import hashlib
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".parquet.tmp"

UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# A value used as a path segment as it is: short, and only characters safe everywhere.
PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,64}")
# What ``path_segment_safe`` makes of any other value: a readable prefix, ``~`` and a digest.
DIGEST_SEGMENT = re.compile(r"[A-Za-z0-9._-]{0,40}~[0-9a-f]{16}")
# Errors that say the disk (or the whole filesystem) refuses writes, not one path: wait and retry.
DISK_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
     errno.EAGAIN, errno.EINTR}
)

# Hive partition values of one row, in the table's ``partition_columns`` order.
Partition = tuple[str, ...]


def path_segment_safe(value: str) -> str:
    """``value`` usable as one path segment (a hive partition value, a host name), never over 57 characters.

    A short value of safe characters stays as it is; any other (too long for a file name, non-ASCII,
    with ``/`` or spaces, ``.`` or ``..``) becomes its first 40 safe characters, ``~`` and 16 hex
    digits of its SHA-256, so no value escapes its directory and two different values never share
    one (``my/agent`` and ``my_agent`` included). The real value stays in the row.
    """
    if (PLAIN_SEGMENT.fullmatch(value) and value.strip(".")) or DIGEST_SEGMENT.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{UNSAFE_PATH_CHARS.sub('_', value)[:40]}~{digest}"


def is_disk_error(error: OSError) -> bool:
    """Whether ``error`` says the disk refuses writes (retry later) rather than that one path is unusable."""
    return error.errno is None or error.errno in DISK_ERRNOS


def local_host() -> str:
    """This host's name as it appears in file names."""
    return path_segment_safe(socket.gethostname())


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this host has exited (a process we may not signal still runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def partition_directory(root: Path, columns: Sequence[str], values: Partition) -> Path:
    """``root/col=value/...``, the hive directory of one partition."""
    return root.joinpath(*(f"{column}={value}" for column, value in zip(columns, values, strict=True)))


def fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomically(path: Path, data: bytes | bytearray, temp: Path) -> None:
    """Write ``data`` to ``path`` whole or not at all: into ``temp`` (same directory; the caller names it so
    its own cleanup recognises a leftover), fsync, rename, directory fsync. ``temp`` is gone either way."""
    try:
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
        fsync_directory(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_abandoned_temp_files(directory: Path) -> int:
    """Delete temp files in ``directory`` whose writer pid (on this host) no longer runs."""
    removed = 0
    host = local_host()
    for temp in directory.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        stem = temp.name.removesuffix(TEMP_SUFFIX)
        pid_text = stem.rsplit("-", 1)[-1]
        if host in stem and pid_text.isdigit() and process_gone(int(pid_text)):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed
