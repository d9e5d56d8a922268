"""Reading tracelearn tables from Parquet files or hive-partitioned dataset directories.

Every file is checked: its ``tracelearn.schema_version`` must be present and not newer than this
code; older files are migrated. Temporary files being written (dot-prefixed) are never read.

Datasets may live on the local disk or in object storage: :func:`locate_files` takes a path or a
URI (``s3://bucket/data``, ``gs://...``, ``abfs://...``) and lists the files through a pyarrow
filesystem; credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...), which pyarrow and polars both read.
"""

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tracelearn.schemas.migrations import SchemaVersionError, columns_added_since, migrate
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


@dataclass(frozen=True)
class DatasetFiles:
    """The complete Parquet files of a dataset directory (or one file), local or in object storage.

    ``paths`` and ``base`` are paths inside ``filesystem``; :meth:`uris` gives what polars scans
    (plain paths locally, ``scheme://path`` in object storage).
    """

    filesystem: pafs.FileSystem
    base: str
    paths: tuple[str, ...]
    scheme: str = ""
    single_file: bool = False

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{path}" if self.scheme else path

    def uris(self) -> list[str]:
        return [self.uri(path) for path in self.paths]

    def child(self, name: str) -> str:
        """The URI (or local path) of ``base/name``."""
        return self.uri(f"{self.base.rstrip('/')}/{name}")


def _filesystem(root: str | Path) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, URI scheme or "" for the local disk) of a path or URI."""
    text = str(root)
    if "://" not in text or text.startswith("file://"):
        return pafs.LocalFileSystem(), str(Path(text.removeprefix("file://")).absolute()), ""
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise DatasetError(f"{text}: not a readable dataset location ({exc})") from None
    return filesystem, path, text.split("://", 1)[0]


def locate_files(root: str | Path) -> DatasetFiles:
    """The complete Parquet files under ``root`` (a path or URI of a directory or one file).

    Skips names starting with ``.`` or ``_`` (temp files, spools). Raises :class:`DatasetError`
    naming ``root`` when it does not exist or cannot be listed.
    """
    filesystem, base, scheme = _filesystem(root)
    try:
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.File:
            return DatasetFiles(filesystem, base, (base,), scheme, single_file=True)
        if info.type != pafs.FileType.Directory:
            raise DatasetError(f"{root}: no such file or directory")
        listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list the dataset ({exc})") from None
    prefix = base.rstrip("/") + "/"
    paths = sorted(
        entry.path
        for entry in listing
        if entry.type == pafs.FileType.File
        and entry.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in entry.path.removeprefix(prefix).split("/"))
    )
    return DatasetFiles(filesystem, base, tuple(paths), scheme)


def is_directory(location: str | Path) -> bool:
    """Whether ``location`` (a path or URI) is a directory; ``False`` when it is missing or unreachable."""
    filesystem, path, _ = _filesystem(location)
    try:
        return bool(filesystem.get_file_info(path).type == pafs.FileType.Directory)
    except OSError:
        return False


def hive_partition_values(path: Path, root: Path) -> dict[str, str]:
    """``{"date": "2026-11-21", "service": "calc"}`` from a path like ``root/date=.../service=.../f``."""
    values = {}
    for part in path.relative_to(root).parts[:-1]:
        key, sep, value = part.partition("=")
        if sep:
            values[key] = value
    return values


def file_schema_version(path: Path | str, expected: TableSpec, filesystem: pafs.FileSystem | None = None) -> int:
    """The schema version recorded in ``path``'s Parquet metadata (in ``filesystem``), checking the table name."""
    try:
        metadata = pq.read_schema(str(path), filesystem=filesystem).metadata or {}
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


def require_current_version(
    path: Path | str, spec: TableSpec, older_fix: str, filesystem: pafs.FileSystem | None = None, where: str = ""
) -> int:
    """Refuse, naming the file, a file a lazy scan cannot read as the current schema of ``spec``; its version.

    Lazy scans (polars) read files as they are, without ``migrate``: a newer version means upgrade; an
    older one is read when every version since only added nullable columns (they read as nulls, see
    ``migrations.columns_added_since``), and refused otherwise with ``older_fix`` (how to rewrite it).
    ``where`` names the file in the message (default ``path``; a URI for object storage).
    """
    version = file_schema_version(path, spec, filesystem)
    where = where or str(path)
    if version > spec.version:
        raise SchemaVersionError(
            f"{where}: {spec.name} schema version {version} is newer than this tracelearn reads ({spec.version}); "
            "upgrade tracelearn"
        )
    if columns_added_since(spec, version) is None:
        raise SchemaVersionError(
            f"{where}: {spec.name} schema version {version} is older than {spec.version}; the lazy scan does not "
            f"migrate, {older_fix}"
        )
    return version


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
