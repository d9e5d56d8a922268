"""The spans dataset as a polars LazyFrame: the edge where the experience pipeline reads capture output.

The dataset may be a local directory or a URI in object storage (``s3://bucket/data``; see
``tracelearn.schemas.dataset.locate_files``). Every file's ``tracelearn.schema_version`` is checked
before anything is scanned, so a dataset written by a newer tracelearn fails up front with the file
named instead of mid-query.
"""

from pathlib import Path

import polars as pl

from tracelearn.schemas.dataset import DatasetError, DatasetFiles, is_directory, locate_files, require_current_version
from tracelearn.schemas.tables import SPANS

PARTITION_SCHEMA = {"date": pl.String, "service": pl.String}


def distinct_spans(spans: pl.LazyFrame) -> pl.LazyFrame:
    """The first row of each ``(trace_id, span_id)``, row order kept: one row per span.

    Duplicates come from at-least-once delivery (OTLP retries, a spool replayed next to its Parquet
    file). A filter on the two key columns costs about 1% of ``unique(subset=...)``, which gathers
    every column of every row.
    """
    return spans.filter(pl.struct("trace_id", "span_id").is_first_distinct())


def spans_location(root: str | Path) -> str:
    """The spans table's location: ``root/spans`` when ``root`` is a data root holding one, else ``root``."""
    text = str(root).rstrip("/")
    child = f"{text}/spans"
    return child if is_directory(child) else text


def _check_versions(files: DatasetFiles) -> None:
    for path in files.paths:
        fix = "rewrite the partition with tracelearn.schemas.dataset.read_table first"
        require_current_version(path, SPANS, fix, files.filesystem, files.uri(path))


def spans_files(root: str | Path, date: str | None = None) -> DatasetFiles:
    """The spans dataset's files (only the ``date=`` partition when ``date`` is given), versions checked.

    Raises ``DatasetError`` when there is no spans file at all, ``SchemaVersionError`` naming a file
    written with a newer (or an older, not lazily migratable) spans schema.
    """
    files = locate_files(spans_location(root))
    if not files.paths:
        raise DatasetError(
            f"{files.uri(files.base)}: no spans Parquet files (expected date=YYYY-MM-DD/service=NAME/*.parquet)"
        )
    if date is not None:
        files = DatasetFiles(
            files.filesystem,
            files.base,
            tuple(path for path in files.paths if f"/date={date}/" in path),
            files.scheme,
            files.single_file,
        )
    _check_versions(files)
    return files


def scan_files(files: DatasetFiles) -> pl.LazyFrame:
    """Lazily scan ``files``; a directory's hive partitions ``date`` and ``service`` become string columns."""
    if files.single_file:
        return pl.scan_parquet(files.uris())
    return pl.scan_parquet(
        files.uris(),
        hive_partitioning=True,
        hive_schema=PARTITION_SCHEMA,
        try_parse_hive_dates=False,
    )


def scan_spans(root: str | Path) -> pl.LazyFrame:
    """Lazily scan every complete spans file under ``root`` (a data root, its ``spans/`` folder, a file, or a URI).

    Adds the hive partition columns ``date`` and ``service`` (strings) when ``root`` is a directory.
    Raises as :func:`spans_files` does.
    """
    return scan_files(spans_files(root))


def spans_dates(root: str | Path) -> list[str]:
    """The ``date=YYYY-MM-DD`` partitions of the spans dataset under ``root`` that hold files, sorted."""
    try:
        files = locate_files(spans_location(root))
    except DatasetError:
        return []
    dates = {part.removeprefix("date=") for path in files.paths for part in path.split("/") if part.startswith("date=")}
    return sorted(dates)
