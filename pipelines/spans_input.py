"""The spans dataset as a polars LazyFrame: the edge where the experience pipeline reads capture output.

Every file's ``tracelearn.schema_version`` is checked before anything is scanned, so a dataset written
by a newer tracelearn fails up front with the file named instead of mid-query.
"""

from pathlib import Path

import polars as pl

from tracelearn.schemas.dataset import DatasetError, dataset_files, file_schema_version
from tracelearn.schemas.migrations import SchemaVersionError
from tracelearn.schemas.tables import SPANS

PARTITION_SCHEMA = {"date": pl.String, "service": pl.String}


def spans_directory(root: str | Path) -> Path:
    """The spans table's directory: ``root/spans`` when ``root`` is a data root holding one, else ``root``."""
    path = Path(root)
    return path / "spans" if (path / "spans").is_dir() else path


def scan_spans(root: str | Path) -> pl.LazyFrame:
    """Lazily scan every complete spans file under ``root`` (a data root, its ``spans/`` folder, or a file).

    Adds the hive partition columns ``date`` and ``service`` (strings) when ``root`` is a directory.
    Raises ``SchemaVersionError`` naming the file when one was written with a newer (or an older,
    not lazily migratable) spans schema, and ``DatasetError`` when there is nothing to scan.
    """
    path = spans_directory(root)
    files = dataset_files(path)
    if not files:
        raise DatasetError(f"{path}: no spans Parquet files (expected date=YYYY-MM-DD/service=NAME/*.parquet)")
    for file in files:
        version = file_schema_version(file, SPANS)
        if version > SPANS.version:
            raise SchemaVersionError(
                f"{file}: spans schema version {version} is newer than this tracelearn reads ({SPANS.version}); "
                "upgrade tracelearn"
            )
        if version < SPANS.version:
            raise SchemaVersionError(
                f"{file}: spans schema version {version} is older than {SPANS.version}; the lazy scan does not "
                "migrate, rewrite the partition with tracelearn.schemas.dataset.read_table first"
            )
    if path.is_file():
        return pl.scan_parquet(files)
    return pl.scan_parquet(
        files,
        hive_partitioning=True,
        hive_schema=PARTITION_SCHEMA,
        try_parse_hive_dates=False,
    )


def spans_dates(root: str | Path) -> list[str]:
    """The ``date=YYYY-MM-DD`` partitions under the spans directory of ``root`` that hold files, sorted."""
    path = spans_directory(root)
    if not path.is_dir():
        return []
    return sorted(
        directory.name.removeprefix("date=")
        for directory in path.glob("date=*")
        if directory.is_dir() and any(directory.rglob("*.parquet"))
    )
