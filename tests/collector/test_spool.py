"""The write-ahead spool: appends, rolls that retire segments, and replay after a writer died."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from tracelearn.collector.parquet_writer import PartitionedParquetWriter
from tracelearn.collector.span_rows import SpanColumns, SpanRecord
from tracelearn.collector.spool import (
    SPOOL_DIR,
    SegmentName,
    read_segment,
    replay_spools,
    unique_rows,
)
from tracelearn.collector.spool_append import Spool
from tracelearn.schemas.dataset import dataset_files, read_table
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, SPANS
from tracelearn.storage.atomic_files import Partition, local_host, path_segment_safe

DAY_1 = 1_790_000_000 * 10**9  # 2026-09-21 (UTC)
DAY_2 = DAY_1 + 86_400 * 10**9


def span_batches(
    first: int, count: int, start_ns: int = DAY_1, service: str = "agent"
) -> dict[Partition, pa.RecordBatch]:
    """``count`` spans of one trace, span ids ``first`` .. ``first + count - 1``, as the exporter builds them."""
    columns = SpanColumns()
    for span_id in range(first, first + count):
        columns.add(
            SpanRecord(
                trace_id=0xABC,
                span_id=span_id,
                parent_span_id=None,
                name=f"span-{span_id}",
                kind="INTERNAL",
                start_ns=start_ns,
                end_ns=start_ns + 1000,
                status_code="UNSET",
                status_message=None,
                resource={"service.name": service},
                scope_name="test",
                attributes={"i": span_id},
            )
        )
    return columns.take()


def batch_list(batches: dict[Partition, pa.RecordBatch]) -> list[tuple[Partition, pa.RecordBatch]]:
    return list(batches.items())


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def spans_root(tmp_path: Path) -> Path:
    return tmp_path / "spans"


def segments(root: Path) -> list[Path]:
    spool = root / SPOOL_DIR
    return sorted(spool.glob("spool-*.arrows")) if spool.exists() else []


def left_by_a_dead_writer(root: Path, appends: list[dict[Partition, pa.RecordBatch]]) -> SegmentName:
    """A segment with ``appends`` that a writer which has exited left behind."""
    spool = Spool(root / SPOOL_DIR, SPANS.schema_with_metadata())
    for batches in appends:
        live = spool.append(batch_list(batches))
    spool.close()
    dead = SegmentName(live.stamp, live.host, dead_pid(), live.writer_id, live.sequence)
    (root / SPOOL_DIR / live.file_name).rename(root / SPOOL_DIR / dead.file_name)
    return dead


def span_names(root: Path) -> list[str]:
    return sorted(read_table(root, "spans").column("name").to_pylist())


def test_a_segment_holds_every_append_with_its_partition(tmp_path: Path) -> None:
    spool = Spool(spans_root(tmp_path) / SPOOL_DIR, SPANS.schema_with_metadata())
    first = spool.append(batch_list(span_batches(1, 2)))
    second = spool.append(batch_list({**span_batches(3, 1), **span_batches(4, 2, start_ns=DAY_2, service="b/c")}))
    assert first == second, "appends go to the active segment until a roll seals it"
    contents = read_segment(spool.directory / first.file_name, partition_width=2)
    assert not contents.torn
    assert contents.schema is not None and contents.schema.metadata[SCHEMA_VERSION_KEY] == str(SPANS.version).encode()
    names = {p: [n for b in batches for n in b.column("name").to_pylist()] for p, batches in contents.batches.items()}
    assert names == {
        ("2026-09-21", "agent"): ["span-1", "span-2", "span-3"],
        ("2026-09-22", path_segment_safe("b/c")): ["span-4", "span-5"],
    }
    assert path_segment_safe("b/c").startswith("b_c~"), "not plain: a readable prefix and a digest"


def test_a_roll_writes_from_memory_names_files_after_the_segment_and_deletes_it(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    writer = PartitionedParquetWriter(root, SPANS)
    writer.add(span_batches(1, 3))
    assert writer.spool_pending() == 3
    (segment,) = segments(root)
    writer.add(span_batches(4, 1))  # exported after the last flush: in memory only
    assert writer.unspooled_rows == 1
    (written,) = writer.flush()
    name = SegmentName.parse(segment.name)
    assert name is not None and written.name == name.parquet_name
    assert not segment.exists(), "the segment goes once its rows are in a durable Parquet file"
    assert span_names(root) == ["span-1", "span-2", "span-3", "span-4"]
    writer.add(span_batches(5, 1))
    writer.spool_pending()
    (next_segment,) = segments(root)
    assert next_segment.name != segment.name, "after a roll, appends start a new segment"
    writer.flush()
    writer.close()
    assert not segments(root)


def test_replay_reads_up_to_a_torn_tail(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    name = left_by_a_dead_writer(root, [span_batches(1, 2), span_batches(3, 2), span_batches(5, 2)])
    path = root / SPOOL_DIR / name.file_name
    intact = read_segment(path, 2)
    assert sum(b.num_rows for bs in intact.batches.values() for b in bs) == 6
    with path.open("r+b") as handle:  # kill -9 during the third append's write
        handle.truncate(path.stat().st_size - 100)
    report = replay_spools(root, SPANS, "zstd")
    assert (report.segments, report.rows, report.torn_tails) == (1, 4, 1)
    assert span_names(root) == ["span-1", "span-2", "span-3", "span-4"]
    assert [p.name for p in dataset_files(root)] == [name.parquet_name]
    assert not segments(root)


def test_a_segment_killed_before_its_first_append_is_removed(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    name = left_by_a_dead_writer(root, [span_batches(1, 1)])
    (root / SPOOL_DIR / name.file_name).write_bytes(b"")
    report = replay_spools(root, SPANS, "zstd")
    assert (report.segments, report.rows, report.torn_tails) == (1, 0, 0)
    assert not segments(root) and not dataset_files(root)


def test_replaying_again_after_a_crash_mid_replay_lands_every_row_once(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    two_partitions = {**span_batches(1, 2), **span_batches(3, 2, start_ns=DAY_2)}
    name = left_by_a_dead_writer(root, [two_partitions])
    segment = root / SPOOL_DIR / name.file_name
    kept = tmp_path / "segment-copy"
    shutil.copy(segment, kept)
    replay_spools(root, SPANS, "zstd")
    # The crash: both Parquet files were written, the segment was not deleted yet.
    shutil.copy(kept, segment)
    again = replay_spools(root, SPANS, "zstd")
    assert (again.segments, again.rows, again.files) == (1, 0, [])
    # The crash one step earlier: the first partition's file written, the second one not.
    second_day = next(p for p in dataset_files(root) if "2026-09-22" in str(p))
    second_day.unlink()
    shutil.copy(kept, segment)
    assert replay_spools(root, SPANS, "zstd").rows == 2
    assert span_names(root) == ["span-1", "span-2", "span-3", "span-4"]
    assert len(dataset_files(root)) == 2 and not segments(root)


def test_a_crash_between_a_roll_and_the_segment_deletion_never_duplicates_rows(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    # A real writer process dies right after its roll made the first partition's file durable.
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_spool import DAY_2, span_batches
        from tracelearn.collector.parquet_writer import PartitionedParquetWriter
        from tracelearn.collector.spool_append import Spool
        from tracelearn.schemas.tables import SPANS

        writer = PartitionedParquetWriter(Path({str(root)!r}), SPANS)
        writer.add({{**span_batches(1, 2), **span_batches(3, 2, start_ns=DAY_2)}})
        writer.spool_pending()
        Spool.mark_written = lambda self, name, rows: os._exit(9)
        writer.flush()
        """
    )
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert died.returncode == 9, died.stderr
    assert len(dataset_files(root)) == 1 and len(segments(root)) == 1
    report = replay_spools(root, SPANS, "zstd")
    assert report.rows == 2, "only the partition the roll had not written yet"
    assert span_names(root) == ["span-1", "span-2", "span-3", "span-4"]
    assert not segments(root)


def test_rows_delivered_twice_are_replayed_once(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    left_by_a_dead_writer(root, [span_batches(1, 3), span_batches(2, 3)])
    report = replay_spools(root, SPANS, "zstd")
    assert (report.rows, report.duplicates) == (4, 2)
    assert span_names(root) == ["span-1", "span-2", "span-3", "span-4"]


def test_unique_rows_keeps_the_first_of_each_key_in_order() -> None:
    table = pa.table({"trace_id": ["t", "t", "u", "t"], "span_id": ["b", "a", "a", "b"], "v": [1, 2, 3, 4]})
    assert unique_rows(table).column("v").to_pylist() == [1, 2, 3]


def test_segments_of_live_writers_and_other_hosts_are_left_alone(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    live = Spool(root / SPOOL_DIR, SPANS.schema_with_metadata())
    live_name = live.append(batch_list(span_batches(1, 1)))
    foreign = SegmentName("20260101T000000", f"not-{local_host()}", dead_pid(), "cafe0001", 1)
    shutil.copy(root / SPOOL_DIR / live_name.file_name, root / SPOOL_DIR / foreign.file_name)
    assert replay_spools(root, SPANS, "zstd").segments == 0
    assert len(segments(root)) == 2 and not (root / "date=2026-09-21").exists()
    live.close()


def test_a_segment_left_by_an_earlier_process_with_this_pid_is_replayed(tmp_path: Path) -> None:
    # A restarted container's agent often gets the same pid (1) as the one that was killed.
    root = spans_root(tmp_path)
    name = left_by_a_dead_writer(root, [span_batches(1, 1)])
    earlier = SegmentName(name.stamp, name.host, os.getpid(), "0ld0ne00", name.sequence)
    (root / SPOOL_DIR / name.file_name).rename(root / SPOOL_DIR / earlier.file_name)
    assert replay_spools(root, SPANS, "zstd").rows == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_leaves_its_parents_rows_to_the_parent(tmp_path: Path) -> None:
    root = spans_root(tmp_path)
    writer = PartitionedParquetWriter(root, SPANS)
    writer.add(span_batches(1, 2))
    writer.spool_pending()
    pid = os.fork()
    if pid == 0:  # the child: a worker process of the agent
        os._exit(0 if writer.buffered_rows == 0 and writer.flush() == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writer.flush()
    assert span_names(root) == ["span-1", "span-2"]
