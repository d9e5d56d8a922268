"""The in-process exporter's partitioned writer: spooled rows are durable before a roll, and a roll does not
hold up appends."""

import threading
import time
from pathlib import Path

import pyarrow as pa

from tracelearn.collector.parquet_writer import PartitionedParquetWriter
from tracelearn.collector.span_rows import SpanColumns, SpanRecord
from tracelearn.collector.spool import SPOOL_DIR, read_segment
from tracelearn.schemas.dataset import dataset_files, read_table
from tracelearn.schemas.tables import SPANS
from tracelearn.storage.atomic_files import Partition

DAY = 1_790_000_000 * 10**9


def span_batches(first: int, count: int) -> list[tuple[Partition, pa.RecordBatch]]:
    """Rows of ``count`` spans with span ids from ``first``, as the receiver builds them."""
    columns = SpanColumns()
    for span_id in range(first, first + count):
        columns.add(
            SpanRecord(0xABC, span_id, None, f"span-{span_id}", "INTERNAL", DAY, DAY + 1000, "UNSET", None,
                       {"service.name": "agent"}, "test", {"i": span_id, "text": "x" * 200})
        )
    return list(columns.take().items())


def segments(root: Path) -> list[Path]:
    return sorted((root / SPOOL_DIR).glob("spool-*.arrows"))


def spool(writer: PartitionedParquetWriter, batches: list[tuple[Partition, pa.RecordBatch]]) -> int:
    writer.add(dict(batches))
    return writer.spool_pending()


def test_spooled_rows_are_durable_before_any_roll(tmp_path: Path) -> None:
    writer = PartitionedParquetWriter(tmp_path, SPANS)
    assert spool(writer, span_batches(1, 5)) == 5
    assert writer.unspooled_rows == 0 and writer.buffered_rows == 5
    [segment] = segments(tmp_path)
    assert sum(b.num_rows for bs in read_segment(segment, 2).batches.values() for b in bs) == 5
    writer.flush()
    assert read_table(tmp_path, "spans").num_rows == 5 and not segments(tmp_path)


def test_appends_go_on_into_a_new_segment_while_a_roll_writes_its_files(tmp_path: Path) -> None:
    writer = PartitionedParquetWriter(tmp_path, SPANS, compression="gzip")  # a slow codec: a long roll
    for first in range(0, 40_000, 4_000):
        spool(writer, span_batches(first, 4_000))
    roll_done = threading.Event()
    rolled: list[Path] = []

    def roll() -> None:
        rolled.extend(writer.flush())
        roll_done.set()

    roller = threading.Thread(target=roll)
    roller.start()
    while writer.buffered_rows:  # the roll took the buffers (and seals their segment under the same lock)
        time.sleep(0.001)
    started = time.monotonic()
    spool(writer, span_batches(100_000, 3))
    append_seconds = time.monotonic() - started
    assert not roll_done.is_set(), "the append finished while the roll was still writing"
    roller.join()
    assert append_seconds < 0.5
    assert len(rolled) == 1 and len(segments(tmp_path)) == 1, "the new segment holds the 3 rows the roll left"
    writer.flush()
    assert len(dataset_files(tmp_path)) == 2
    table = read_table(tmp_path, "spans")
    assert table.num_rows == 40_003 and len(set(table.column("span_id").to_pylist())) == 40_003
    assert not segments(tmp_path)
