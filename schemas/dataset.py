"""Reading tracelearn tables from Parquet files or hive-partitioned dataset directories.

Every file is checked: its ``tracelearn.schema_version`` must be present and not newer than this
code; older files are migrated. Temporary files being written (dot-prefixed) are never read.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.schemas.migrations import SchemaVersionError, migrate
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, TABLE_NAME_KEY, TableSpec, table_spec


class DatasetError(ValueError):
    """A dataset path or file cannot be read as the requested table."""


def dataset_files(root: str | Path) -> list[Path]:
    """Complete Parquet files under ``root`` (a file or directory), sorted, skipping ``.``/``_`` names."""
    path = Path(root)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or directory")
    return sorted(
        p for p in path.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )


def hive_partition_values(path: Path, root: Path) -> dict[str, str]:
    """``{"date": "2026-11-21", "service": "calc"}`` from a path like ``root/date=.../service=.../f``."""
    values = {}
    for part in path.relative_to(root).parts[:-1]:
        key, sep, value = part.partition("=")
        if sep:
            values[key] = value
    return values


def file_schema_version(path: Path, expected: TableSpec) -> int:
    """The schema version recorded in ``path``'s Parquet metadata, checking the table name."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc
    raw = metadata.get(SCHEMA_VERSION_KEY)
    if raw is None:
        raise DatasetError(
            f"{path}: no {SCHEMA_VERSION_KEY.decode()} in the Parquet metadata; not a tracelearn {expected.name} file"
        )
    table = metadata.get(TABLE_NAME_KEY, expected.name.encode()).decode()
    if table != expected.name:
        raise DatasetError(f"{path}: holds the {table!r} table, expected {expected.name!r}")
    try:
        return int(raw)
    except ValueError:
        raise SchemaVersionError(f"{path}: schema version {raw!r} is not an integer") from None


def read_table_file(path: Path, spec: TableSpec) -> pa.Table:
    """One file as the current schema of ``spec`` (migrated if older)."""
    version = file_schema_version(path, spec)
    table = pq.read_table(path)
    return migrate(table, spec, version, str(path))


def read_table(root: str | Path, table: str, with_partitions: bool = False) -> pa.Table:
    """Read every file of ``table`` under ``root`` into one Arrow table of the current schema.

    With ``with_partitions`` the hive partition values (``date``, ``service``) become string columns.
    """
    spec = table_spec(table)
    root_path = Path(root)
    files = dataset_files(root_path)
    parts = []
    for path in files:
        part = read_table_file(path, spec)
        if with_partitions and root_path.is_dir():
            for key, value in hive_partition_values(path, root_path).items():
                part = part.append_column(key, pa.array([value] * part.num_rows, pa.string()))
        parts.append(part)
    if not parts:
        empty = spec.schema_with_metadata().empty_table()
        if with_partitions:
            for key in spec.partition_columns:
                empty = empty.append_column(key, pa.array([], pa.string()))
        return empty
    return pa.concat_tables(parts, promote_options="default")
