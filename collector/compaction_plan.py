"""Which files of a spans partition a compaction merges, and into which outputs.

Only finished files are inputs (see ``compaction``): ``part-*.parquet`` directly in the partition
directory, modified at least ``min_age_seconds`` ago, whose spool segment or request log is gone, of
the spans table at this tracelearn's schema version (or an older one a registered migration lifts),
with the spans columns, smaller than the target. They are packed first-fit, in name (time) order,
into outputs of at most ``target_bytes`` uncompressed; an output of one file is left as it is.

May import: tracelearn.collector (compaction_safety, spool), tracelearn.schemas, pyarrow.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.collector.compaction_safety import PART_PREFIX, PART_SUFFIX
from tracelearn.collector.spool import (
    REQUEST_LOG_PREFIX,
    REQUEST_LOG_SUFFIX,
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    SPOOL_DIR,
)
from tracelearn.schemas.dataset import DatasetError, file_schema_version
from tracelearn.schemas.migrations import MIGRATIONS, SchemaVersionError
from tracelearn.schemas.tables import SPANS

# The size a compaction planned an output at, in its metadata: a second run packs by it.
PLANNED_BYTES_KEY = b"tracelearn.compaction.planned_bytes"


@dataclass(frozen=True)
class InputFile:
    """A finished file chosen for merging."""

    path: Path
    file_bytes: int  # on disk
    planned_bytes: int  # uncompressed estimate, or the size a compaction planned the file at
    rows: int
    version: int


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class PlannedOutput:
    inputs: tuple[InputFile, ...]

    @property
    def planned_bytes(self) -> int:
        return sum(item.planned_bytes for item in self.inputs)

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.inputs)

    @property
    def file_bytes(self) -> int:
        return sum(item.file_bytes for item in self.inputs)


@dataclass(frozen=True)
class PartitionPlan:
    directory: Path
    outputs: tuple[PlannedOutput, ...]
    skipped: tuple[SkippedFile, ...]


# --- Choosing the inputs ----------------------------------------------------------------------------


def migration_path_exists(version: int) -> bool:
    """Whether registered migrations lift spans files of ``version`` to the current version."""
    return all((SPANS.name, step) in MIGRATIONS for step in range(version, SPANS.version))


def planned_size(metadata: pq.FileMetaData) -> int:
    """A file's size for packing: what a compaction planned it at, else its uncompressed row groups."""
    recorded = (metadata.metadata or {}).get(PLANNED_BYTES_KEY)
    if recorded is not None and recorded.isdigit():
        return int(recorded)
    return sum(metadata.row_group(index).total_byte_size for index in range(metadata.num_row_groups))


def inspect_file(
    path: Path, now: float, min_age_seconds: float, target_bytes: int, spool: Path
) -> InputFile | SkippedFile:
    """``path`` as an input, or why it is left alone."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return SkippedFile(path, "deleted while the partition was being listed")
    age = now - stat.st_mtime
    if age < min_age_seconds:
        return SkippedFile(path, f"modified {age:.0f} s ago, less than --min-age-seconds {min_age_seconds:g}")
    # A sidecar's conversion batches after the first are named part-<stem>+<n>.parquet.
    stem = path.name.removeprefix(PART_PREFIX).removesuffix(PART_SUFFIX).partition("+")[0]
    if (spool / f"{SEGMENT_PREFIX}{stem}{SEGMENT_SUFFIX}").exists() or (
        spool / f"{REQUEST_LOG_PREFIX}{stem}{REQUEST_LOG_SUFFIX}"
    ).exists():
        return SkippedFile(path, "its spool segment is still pending (a replay would write this file again)")
    try:
        version = file_schema_version(path, SPANS)
        metadata = pq.read_metadata(path)
    except (DatasetError, SchemaVersionError, OSError, pa.ArrowInvalid) as exc:
        return SkippedFile(path, str(exc).removeprefix(f"{path}: "))
    if version > SPANS.version:
        return SkippedFile(path, f"schema version {version} is newer than this tracelearn's ({SPANS.version})")
    if version < SPANS.version and not migration_path_exists(version):
        return SkippedFile(path, f"schema version {version} has no migration to version {SPANS.version}")
    if version == SPANS.version and not metadata.schema.to_arrow_schema().equals(SPANS.schema, check_metadata=False):
        return SkippedFile(path, f"its columns are not those of spans schema version {SPANS.version}")
    planned = planned_size(metadata)
    if planned >= target_bytes:
        return SkippedFile(path, f"already {planned / 2**20:.1f} MiB, at or above the target")
    return InputFile(path, stat.st_size, planned, metadata.num_rows, version)


def pack_first_fit(inputs: Sequence[InputFile], target_bytes: int) -> list[list[InputFile]]:
    """Groups of at most ``target_bytes``, each input in the first group it fits, inputs kept in order.

    First-fit (not next-fit): an input opens a group only when it fits in none, so no two final
    groups fit together, whatever the order of the next run's listing.
    """
    groups: list[list[InputFile]] = []
    sizes: list[int] = []
    for item in inputs:
        for index, size in enumerate(sizes):
            if size + item.planned_bytes <= target_bytes:
                groups[index].append(item)
                sizes[index] += item.planned_bytes
                break
        else:
            groups.append([item])
            sizes.append(item.planned_bytes)
    return groups


def plan_partition(directory: Path, target_bytes: int, min_age_seconds: float) -> PartitionPlan:
    """Which files of the partition ``directory`` merge into which outputs, and which stay, and why."""
    now = time.time()
    spool = directory.parent.parent / SPOOL_DIR
    inputs: list[InputFile] = []
    skipped: list[SkippedFile] = []
    for path in sorted(directory.glob(f"*{PART_SUFFIX}")):
        if path.name.startswith((".", "_")):
            continue  # invisible to readers, not ours to merge
        checked = (
            inspect_file(path, now, min_age_seconds, target_bytes, spool)
            if path.name.startswith(PART_PREFIX)
            else SkippedFile(path, "not a tracelearn part-*.parquet file")
        )
        if isinstance(checked, InputFile):
            inputs.append(checked)
        else:
            skipped.append(checked)
    outputs = []
    for group in pack_first_fit(inputs, target_bytes):
        if len(group) == 1:
            skipped.append(SkippedFile(group[0].path, "no other small file fits with it"))
        else:
            outputs.append(PlannedOutput(tuple(group)))
    return PartitionPlan(directory, tuple(outputs), tuple(sorted(skipped, key=lambda s: s.path)))
