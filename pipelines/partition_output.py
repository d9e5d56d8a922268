"""Writing a build's output: one file per ``date=`` partition of a table, all committed or none.

A build appends each bucket's rows to the file of their date partition (temp files, renamed into
place only when every bucket built) and counts the rollouts that late spans grew since the
previous output of the same config.
"""

from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa

from tracelearn.storage.atomic_files import partition_directory
from tracelearn.storage.atomic_parquet import AtomicParquetWriter

__all__ = ["COMPRESSION", "OUTPUT_DATE", "DatePartitionFiles", "late_span_rollouts"]

COMPRESSION = "zstd"
# The column holding each output row's date partition (the rollout's start date, UTC).
OUTPUT_DATE = "__output_date"


class DatePartitionFiles:
    """One appendable output file per ``date=`` partition of a table, all committed or all aborted."""

    def __init__(
        self,
        root: Path,
        file_name: str,
        to_arrow: Callable[[pl.DataFrame], pa.Table],
        dictionary_columns: list[str] | None = None,
    ) -> None:
        self.root = root
        self.file_name = file_name
        self.to_arrow = to_arrow
        self.dictionary_columns = dictionary_columns
        self.files: dict[str, AtomicParquetWriter] = {}

    def append(self, frame: pl.DataFrame, sort_by: list[str]) -> None:
        """Append ``frame``'s rows (sorted by ``sort_by``) to the file of each of its ``OUTPUTOUTPUT_DATE`` values."""
        for (date,), part in frame.partition_by(OUTPUT_DATE, as_dict=True, include_key=False).items():
            table = self.to_arrow(part.sort(sort_by))
            writer = self.files.get(date)
            if writer is None:
                directory = partition_directory(self.root, ["date"], (date,))
                writer = AtomicParquetWriter(
                    table.schema, directory, self.file_name, COMPRESSION, self.dictionary_columns
                )
                self.files[date] = writer
            writer.write(table)

    def commit(self) -> list[Path]:
        return [self.files[date].commit() for date in sorted(self.files)]

    def abort(self) -> None:
        for writer in self.files.values():
            writer.abort()


def late_span_rollouts(rollouts_root: Path, file_name: str, built: pl.DataFrame) -> int:
    """How many rollouts of ``built`` had fewer spans in the previous output of their partition.

    These are the rollouts that late spans (arriving after a rollout passed the watermark and was
    built) reached only through this rebuild; counting them makes late data visible instead of
    silently merged. Reads ``rollout_id``, ``n_spans`` and ``OUTPUTOUTPUT_DATE`` of ``built`` and the previous
    ``rollouts`` files of the same config (``file_name``), if any.
    """
    previous = [
        path
        for (date,) in built.select(OUTPUT_DATE).unique().iter_rows()
        if (path := partition_directory(rollouts_root, ["date"], (date,)) / file_name).is_file()
    ]
    if not previous:
        return 0
    before = pl.scan_parquet(previous).select("rollout_id", pl.col("n_spans").alias("__before"))
    grown = built.lazy().join(before, on="rollout_id", how="inner").filter(pl.col("n_spans") > pl.col("__before"))
    return int(grown.select(pl.len()).collect().item())
