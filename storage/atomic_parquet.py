"""Parquet files that appear complete or not at all: temp name, fsync, rename, directory fsync.

``write_parquet_atomically`` writes one table in one go; ``AtomicParquetWriter`` appends row groups
and commits (or aborts) at the end. The collector, the pipelines, training and APO write every
Parquet file of theirs through these.
"""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.storage.atomic_files import TEMP_PREFIX, TEMP_SUFFIX, fsync_directory

ROW_GROUP_ROWS = 1_000_000


def write_parquet_atomically(
    table: pa.Table, directory: Path, file_name: str, compression: str, row_group_rows: int = ROW_GROUP_ROWS
) -> Path:
    """Write ``table`` to ``directory/file_name`` so that the file appears complete or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / file_name
    temp = directory / f"{TEMP_PREFIX}{file_name.removesuffix('.parquet')}-{os.getpid()}{TEMP_SUFFIX}"
    try:
        with temp.open("wb") as handle:
            pq.write_table(
                table,
                handle,
                compression=None if compression == "none" else compression,
                row_group_size=row_group_rows,
            )
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(final)
        fsync_directory(directory)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return final


class AtomicParquetWriter:
    """A Parquet file written in several appends that appears complete or not at all.

    Row groups go to a temp file next to ``directory/file_name``; :meth:`commit` fsyncs it and
    renames it into place, :meth:`abort` removes it. Used where a file is produced piece by piece
    (a build that holds one bucket of rows at a time) and must still replace its previous version
    in one step.
    """

    def __init__(
        self,
        schema: pa.Schema,
        directory: Path,
        file_name: str,
        compression: str,
        dictionary_columns: list[str] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.final = directory / file_name
        self.temp = directory / f"{TEMP_PREFIX}{file_name.removesuffix('.parquet')}-{os.getpid()}{TEMP_SUFFIX}"
        self._handle = self.temp.open("wb")
        self._writer = pq.ParquetWriter(
            self._handle,
            schema,
            compression=None if compression == "none" else compression,
            # Dictionary-encoding long, mostly distinct text (prompts) costs time and grows the file;
            # callers name the low-cardinality columns where it pays off (None: every column).
            use_dictionary=True if dictionary_columns is None else dictionary_columns,
        )

    def write(self, table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        """Append ``table`` (the writer's schema) as one or more row groups."""
        self._writer.write_table(table, row_group_size=row_group_rows)

    def commit(self) -> Path:
        """Close, fsync and rename the file into place; returns its final path."""
        self._writer.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self.temp.replace(self.final)
        fsync_directory(self.final.parent)
        return self.final

    def abort(self) -> None:
        """Drop everything written; the previous file at the final path (if any) stays."""
        try:
            self._writer.close()
        finally:
            self._handle.close()
            self.temp.unlink(missing_ok=True)
