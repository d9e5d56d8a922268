"""The spans dataset as a polars LazyFrame: the edge where the experience pipeline reads capture output.

The dataset may be a local directory or a URI in object storage (``s3://bucket/data``; see
``tracelearn.schemas.dataset.locate_files``). Every file's ``tracelearn.schema_version`` and columns
are checked before anything is scanned, so a dataset written by a newer tracelearn, or a file whose
columns are not the schema's (a column missing, added, or of another type), fails up front with the
file and the column named instead of mid-query.
"""

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tracelearn.schemas.dataset import DatasetError, DatasetFiles, is_directory, locate_files, require_current_version
from tracelearn.schemas.migrations import columns_added_since
from tracelearn.schemas.tables import SPANS, TableSpec

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


def check_columns(
    path: str, spec: TableSpec, filesystem: pafs.FileSystem | None = None, where: str = "", version: int | None = None
) -> None:
    """Raise ``DatasetError`` naming the file (``where``, default ``path``) and the first column that is
    missing, of another type than ``spec``'s current schema, or not in it. Reads the Parquet footer only.

    A file of an older ``version`` may lack the nullable columns added since (a lazy scan reads them as
    nulls: ``tracelearn.schemas.migrations.columns_added_since``)."""
    where = where or path
    may_lack = columns_added_since(spec, version) if version is not None else None
    try:
        found = pq.read_schema(path, filesystem=filesystem)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"{where}: not a readable Parquet file ({exc})") from exc
    for expected in spec.schema:
        index = found.get_field_index(expected.name)
        if index < 0 and may_lack is not None and expected.name in may_lack:
            continue
        if index < 0:
            raise DatasetError(
                f"{where}: column {expected.name!r} is missing ({spec.name} schema version {spec.version})"
            )
        if not found.field(index).type.equals(expected.type):
            raise DatasetError(
                f"{where}: column {expected.name!r} is {found.field(index).type}, but the {spec.name} schema "
                f"(version {spec.version}) has {expected.type}; the file was not written by tracelearn's writer: "
                "rewrite it with the schema's types, or move it out of the dataset"
            )
    extra = [name for name in found.names if spec.schema.get_field_index(name) < 0]
    if extra:
        raise DatasetError(f"{where}: column {extra[0]!r} is not in the {spec.name} schema (version {spec.version})")


def _check_versions(files: DatasetFiles) -> None:
    for path in files.paths:
        fix = "rewrite the partition with tracelearn.schemas.dataset.read_table first"
        version = require_current_version(path, SPANS, fix, files.filesystem, files.uri(path))
        check_columns(path, SPANS, files.filesystem, files.uri(path), version)


def spans_files(root: str | Path, date: str | None = None) -> DatasetFiles:
    """The spans dataset's files (only the ``date=`` partition when ``date`` is given), versions checked.

    Raises ``DatasetError`` when there is no spans file at all or naming a file and a column that is not
    the schema's, ``SchemaVersionError`` naming a file written with a newer (or an older, not lazily
    migratable) spans schema.
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


# The spans table as polars reads it: files of older versions lack the columns added since, which the
# scan inserts as nulls.
SPANS_FRAME_SCHEMA = pl.DataFrame(SPANS.schema.empty_table()).schema


def scan_files(files: DatasetFiles) -> pl.LazyFrame:
    """Lazily scan ``files``; a directory's hive partitions ``date`` and ``service`` become string columns.

    Columns an older file lacks (nullable ones added by a later schema version) read as nulls."""
    if files.single_file:
        return pl.scan_parquet(files.uris(), schema=SPANS_FRAME_SCHEMA, missing_columns="insert")
    return pl.scan_parquet(
        files.uris(),
        schema=SPANS_FRAME_SCHEMA,
        missing_columns="insert",
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
