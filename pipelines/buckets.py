"""Bounded-memory builds: split a spans dataset into buckets of whole rollouts and whole advantage groups.

A build holds one bucket's spans in memory at a time, so a spans dataset larger than memory builds
with a peak that depends on the bucket size, not on the dataset size. Buckets are cut so every
computation of the build stays inside one bucket:

- a rollout's spans all land in one bucket (rollouts are the unit of rewards, credit and transitions);
- a rollout joined from several traces (an agent that opens no span of its own: its calls are
  joined by conversation, ``tracelearn.pipelines.rollout_identity``) lands whole: the build settles
  rollout identity over the whole dataset first and buckets by the joined rollout id;
- every rollout of one advantage group lands in one bucket: the bucket is a hash of the rollout-level
  columns among ``advantage.group_by`` (``task_id``, ``group_id``, ``attempt_id``, ``rollout_id``), so
  GRPO statistics see the whole group. A ``group_by`` without such a column (say ``[agent_name]``)
  cannot be cut and builds as one bucket.

Steps: :func:`bucket_count` from the Parquet footers (uncompressed bytes, no data read);
:func:`rollout_group_keys` (a streaming pass over small columns, plus one prompt per rollout for the
derived task id, the same rule as ``rollouts.rollout_task_ids``); :func:`assign_buckets` (a stable
SHA-256 of the key, so the same input always gives the same buckets); :func:`spill_buckets` (one
streaming pyarrow pass that writes each bucket's spans to its own Arrow IPC files, scanned back by
:func:`scan_bucket`).
"""

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tracelearn.pipelines.rollouts import first_by_call_order, rollout_task_ids
from tracelearn.pipelines.spans_input import PARTITION_SCHEMA
from tracelearn.schemas.dataset import DatasetFiles

__all__ = [
    "BUCKET_BYTES",
    "ROLLOUT_LEVEL_COLUMNS",
    "assign_buckets",
    "bucket_columns",
    "bucket_count",
    "rollout_group_keys",
    "scan_bucket",
    "spill_buckets",
]

# Uncompressed span bytes per bucket. A bucket's build holds a few copies of its input (joins,
# sorts, the transitions), so 256 MiB keeps the peak around a gigabyte or two.
BUCKET_BYTES = 256 * 1024 * 1024
ROLLOUT_LEVEL_COLUMNS: tuple[str, ...] = ("task_id", "group_id", "attempt_id", "rollout_id")
BUCKET = "__bucket"
KEY = "__group_key"
_SPILL_BATCH_ROWS = 65_536


def bucket_columns(group_by: Sequence[str]) -> list[str]:
    """The rollout-level columns of ``group_by`` (in order) that can cut buckets; empty: one bucket only."""
    return [column for column in group_by if column in ROLLOUT_LEVEL_COLUMNS]


def uncompressed_bytes(files: DatasetFiles) -> int:
    """Total uncompressed size of ``files`` from their Parquet footers (no data pages are read)."""
    total = 0
    for path in files.paths:
        metadata = pq.read_metadata(path, filesystem=files.filesystem)
        total += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return total


def bucket_count(files: DatasetFiles, bucket_bytes: int = BUCKET_BYTES) -> int:
    """How many buckets keep each under ``bucket_bytes`` uncompressed (at least 1)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size {bucket_bytes} bytes must be positive")
    return max(1, math.ceil(uncompressed_bytes(files) / bucket_bytes))


def rollout_group_keys(spans: pl.LazyFrame, columns: Sequence[str]) -> pl.LazyFrame:
    """Per rollout: ``rollout_id`` and ``columns`` with the values the build will give the rollout.

    ``task_id`` follows ``rollouts.rollout_task_ids`` (explicit, else derived from the first prompt),
    the others are the earliest non-null value, as ``rollouts.build_rollouts`` picks them. Reads
    ``rollout_id``, ``start_time``, ``trace_id``, ``span_id`` and, as needed, ``task_id``,
    ``group_id``, ``attempt_id``, ``span_type``, ``input_messages``; only small columns are grouped.
    """
    plain = [c for c in columns if c not in ("rollout_id", "task_id")]
    keys = spans.group_by("rollout_id").agg(*(first_by_call_order(c).alias(c) for c in plain))
    if "task_id" in columns:
        keys = keys.join(rollout_task_ids(spans), on="rollout_id", how="left")
    return keys.select("rollout_id", *(c for c in columns if c != "rollout_id"))


def _stable_bucket(key: str | None, buckets: int) -> int:
    if key is None:
        return 0
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % buckets


def assign_buckets(keys: pl.DataFrame, columns: Sequence[str], buckets: int) -> pl.DataFrame:
    """``rollout_id, __bucket`` (UInt32): rollouts with equal ``columns`` share a bucket.

    The bucket is SHA-256 of the key (its columns as JSON) modulo ``buckets``: stable across runs,
    processes and polars versions. Rollouts whose key is entirely null share bucket 0.
    """
    key = pl.concat_list([pl.col(c).cast(pl.String) for c in columns]) if columns else pl.lit(None)
    with_key = keys.with_columns(
        pl.when(pl.all_horizontal([pl.col(c).is_null() for c in columns]) if columns else pl.lit(True))
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(key.list.join("\x1f", ignore_nulls=False))
        .alias(KEY)
    )
    distinct = with_key.select(KEY).unique()
    hashed = distinct.with_columns(
        pl.col(KEY)
        .map_elements(lambda k: _stable_bucket(k, buckets), return_dtype=pl.UInt32, skip_nulls=False)
        .alias(BUCKET)
    )
    return with_key.join(hashed, on=KEY, how="left", nulls_equal=True).select("rollout_id", BUCKET).sort("rollout_id")


def _spans_dataset(files: DatasetFiles) -> ds.Dataset:
    partitioning = ds.partitioning(pa.schema([(name, pa.string()) for name in PARTITION_SCHEMA]), flavor="hive")
    return ds.dataset(
        list(files.paths),
        format="parquet",
        filesystem=files.filesystem,
        partitioning=partitioning,
        partition_base_dir=files.base,
    )


def spill_buckets(
    files: DatasetFiles,
    assignment: pl.DataFrame,
    buckets: int,
    directory: Path,
    routes: pl.DataFrame | None = None,
) -> list[Path]:
    """Write each bucket's spans to ``directory/bucket=NNNNN/`` as Arrow IPC (lz4) files, one pass.

    ``files`` are the spans dataset's Parquet files (hive ``date=``/``service=`` directories become
    string columns, as ``scan_spans`` makes them); ``assignment`` maps ``rollout_id`` to
    ``__bucket``; ``routes`` (``trace_id, rollout_id``) gives the rollout of traces whose spans still
    carry another id (loose calls joined by conversation, detached calls; the spilled rows are unchanged).
    Spans of rollouts not in ``assignment`` are skipped. Reads record batches and writes them out,
    so memory stays at a few batches whatever the dataset size. Returns the bucket directories,
    index = bucket.
    """
    dataset = _spans_dataset(files)
    ids = pa.array(assignment.get_column("rollout_id").to_list(), pa.string())
    bucket_of = pa.array(assignment.get_column(BUCKET).to_list(), pa.uint32())
    loose = joined = None
    if routes is not None and routes.height:
        loose = pa.array(routes.get_column("trace_id").to_list(), pa.string())
        joined = pa.array(routes.get_column("rollout_id").to_list(), pa.string())
    directories = [directory / f"bucket={b:05d}" for b in range(buckets)]
    for path in directories:
        path.mkdir(parents=True, exist_ok=True)
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    scanner = dataset.scanner(batch_size=_SPILL_BATCH_ROWS)
    try:
        for batch in scanner.to_batches():
            if batch.num_rows == 0:
                continue
            rollout = batch.column("rollout_id")
            if loose is not None and joined is not None:
                mapped = pc.take(joined, pc.index_in(batch.column("trace_id"), value_set=loose))
                rollout = pc.coalesce(mapped, rollout)
            positions = pc.index_in(rollout, value_set=ids)
            targets = pc.take(bucket_of, positions)
            for value in pc.unique(targets.drop_null()).to_pylist():
                part = batch.filter(pc.equal(targets, pa.scalar(value, pa.uint32())))
                writer = writers.get(value)
                if writer is None:
                    sink = directories[value] / "spans.arrow"
                    writer = pa.ipc.new_file(str(sink), batch.schema, options=options)
                    writers[value] = writer
                writer.write_batch(part)
    finally:
        for writer in writers.values():
            writer.close()
    return directories


def scan_bucket(directory: Path) -> pl.LazyFrame | None:
    """The spans of one spilled bucket as a LazyFrame with the columns of ``scan_spans``; ``None`` if empty."""
    files = sorted(directory.glob("*.arrow"))
    if not files:
        return None
    return pl.scan_ipc(files)
