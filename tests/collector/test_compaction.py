"""Compaction of a spans partition: every span once, large row groups, crash-safe, safe next to a writer."""

import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support.spans_factory import SpansFactory

from tracelearn.cli.main import main
from tracelearn.collector.compaction import (
    LOCK_NAME,
    CompactionConflictError,
    CompactionError,
    CompactionEvent,
    CompactionLockedError,
    Step,
    compact,
    superseded_inputs,
)
from tracelearn.collector.parquet_writer import PartitionedParquetWriter
from tracelearn.collector.span_rows import SpanColumns
from tracelearn.collector.spool import SPOOL_DIR, SegmentName, replay_spools
from tracelearn.schemas.dataset import dataset_files, read_table, read_table_file
from tracelearn.schemas.migrations import MIGRATIONS
from tracelearn.schemas.tables import FEEDBACK, SCHEMA_VERSION_KEY, SPANS, TABLE_NAME_KEY
from tracelearn.storage.atomic_files import local_host

DATE = "2026-11-21"  # the factory's reference day
SERVICE = "calc-agent"
SPANS_PER_ROLLOUT = 4
CURRENT = str(SPANS.version).encode()
HOUR = 3600


def partition(data: Path) -> Path:
    return data / "spans" / f"date={DATE}" / f"service={SERVICE}"


def rollout(factory: SpansFactory, trace: int) -> None:
    """One agent run: root, LLM call, tool call, reward (4 spans; span ids 1-4 from a new factory)."""
    start = trace * 20.0
    root = factory.root(trace, start, start + 10, task_id=f"task-{trace % 3}")
    factory.llm(trace, root, start + 1, user=f"what is {trace} + 1?")
    factory.tool(trace, root, start + 2)
    factory.reward(trace, root, start + 9, float(trace % 2))


def rollout_file(data: Path, trace: int) -> Path:
    """The file the collector rolls after one rollout (written by its own Parquet writer)."""
    factory = SpansFactory(data / "spans", SERVICE)
    rollout(factory, trace)
    (path,) = factory.write()
    return path


def small_files(data: Path, traces: range, age_seconds: float = HOUR) -> list[Path]:
    """One collector file per rollout, last modified ``age_seconds`` ago."""
    paths = [rollout_file(data, trace) for trace in traces]
    make_old(paths, age_seconds)
    return paths


def make_old(paths: list[Path], age_seconds: float = HOUR) -> None:
    for path in paths:
        stat = path.stat()
        os.utime(path, (stat.st_atime - age_seconds, stat.st_mtime - age_seconds))


def with_stamp(path: Path, stamp: str) -> Path:
    """``path`` renamed as if written at ``stamp`` (names sort by their stamp first)."""
    return path.with_name(f"part-{stamp}-{path.name.split('-', 2)[2]}")


def keys_of(table: pa.Table) -> Counter[tuple[str, str]]:
    return Counter(zip(table.column("trace_id").to_pylist(), table.column("span_id").to_pylist(), strict=True))


def span_keys(data: Path) -> Counter[tuple[str, str]]:
    """How often each (trace_id, span_id) is in the files a reader lists."""
    return keys_of(read_table(data / "spans", "spans"))


def file_keys(paths: list[Path]) -> Counter[tuple[str, str]]:
    """How often each (trace_id, span_id) is in ``paths``."""
    return sum((keys_of(read_table_file(path, SPANS)) for path in paths), Counter())


def expected_keys(traces: range) -> set[tuple[str, str]]:
    return {(f"{trace:032x}", f"{span:016x}") for trace in traces for span in range(1, SPANS_PER_ROLLOUT + 1)}


def listing(directory: Path) -> dict[str, int]:
    """Every entry of ``directory`` (hidden ones too) and its modification time."""
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


def test_small_files_become_one_sorted_file_with_every_span_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inputs = small_files(data, range(1, 13))
    # A client retry delivered trace 3's LLM and tool spans a second time, in a later file.
    retry = SpansFactory(data / "spans", SERVICE)
    retry.span(3, "chat smollm2-135m", 61, parent=1, span_id=2)
    retry.span(3, "execute_tool add", 62, parent=1, span_id=3)
    inputs += retry.write()
    make_old(inputs[-1:])
    bytes_before = sum(path.stat().st_size for path in inputs)

    report = compact(data, DATE, min_age_seconds=0)

    assert (report.files_read, report.rows_in, report.rows_out, report.duplicates_removed) == (13, 50, 48, 2)
    (output,) = report.files_written
    assert dataset_files(data / "spans") == [output] and not any(path.exists() for path in inputs)
    keys = span_keys(data)
    assert set(keys) == expected_keys(range(1, 13)) and set(keys.values()) == {1}
    assert (report.bytes_before, report.bytes_after) == (bytes_before, output.stat().st_size)
    assert report.bytes_after < bytes_before / 5, "one footer and schema instead of thirteen"
    metadata = pq.read_metadata(output)
    assert metadata.num_row_groups == 1 and metadata.row_group(0).num_rows == 48, "one large row group"
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    assert metadata.metadata[SCHEMA_VERSION_KEY] == CURRENT and metadata.metadata[TABLE_NAME_KEY] == b"spans"
    table = read_table_file(output, SPANS)
    order = list(zip(*(table.column(c).to_pylist() for c in ("trace_id", "start_time", "span_id")), strict=True))
    assert order == sorted(order), "sorted by (trace_id, start_time, span_id)"
    assert table.schema.equals(SPANS.schema, check_metadata=False)


def test_the_target_bounds_files_and_row_groups_and_a_second_run_does_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inputs = small_files(data, range(1, 31))
    # Trace 1 delivered again, later: the original (named first) goes to the first output, the copy
    # (named last) to the last one, so the copy is dropped across outputs.
    inputs[0] = inputs[0].rename(with_stamp(inputs[0], "20000101T000000"))
    retry = rollout_file(data, 1)
    make_old([retry.rename(with_stamp(retry, "20991231T235959"))])
    one_file = pq.read_metadata(inputs[0]).row_group(0).total_byte_size  # uncompressed
    target = 8 * one_file + one_file // 2  # room for 8 inputs per output

    report = compact(data, DATE, target_bytes=target, row_group_bytes=3 * one_file, min_age_seconds=0)

    assert len(report.files_written) == 4 and report.rows_out == 30 * SPANS_PER_ROLLOUT
    assert report.duplicates_removed == SPANS_PER_ROLLOUT
    for output in report.files_written:
        metadata = pq.read_metadata(output)
        assert int(metadata.metadata[b"tracelearn.compaction.planned_bytes"]) <= target
        groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        # About three inputs' worth of rows per row group: 12 rows, 11 where inputs differ by a few bytes.
        assert len(groups) >= 2 and all(11 <= rows <= 12 for rows in groups[:-1]), groups
    assert set(span_keys(data).values()) == {1}
    before = listing(partition(data))
    again = compact(data, DATE, target_bytes=target, row_group_bytes=3 * one_file, min_age_seconds=0)
    assert (again.files_read, again.files_written) == (0, [])
    assert listing(partition(data)) == before, "nothing written, renamed or deleted"


def test_young_files_temp_files_and_the_spool_are_left_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = small_files(data, range(1, 5))
    young = small_files(data, range(5, 7), age_seconds=0)
    directory = partition(data)
    # A collector's file being written right now, and a rollout spooled but not rolled yet.
    temp = (
        directory / f".tmp-part-20261121T120000-{local_host()}-{os.getpid()}-feedbeef-000009-{os.getpid()}.parquet.tmp"
    )
    temp.write_bytes(b"PAR1 half a file")
    writer = PartitionedParquetWriter(data / "spans", SPANS)
    factory = SpansFactory(data / "spans", SERVICE)
    rollout(factory, 99)
    columns = SpanColumns()
    columns.add_all(factory.records)
    writer.add(columns.take())
    writer.spool_pending()
    spool_before = {path.name: path.read_bytes() for path in (data / "spans" / SPOOL_DIR).iterdir()}

    report = compact(data, DATE)  # the default --min-age-seconds, 60

    assert report.files_read == 4 and not any(path.exists() for path in old)
    assert all(path.exists() for path in young)
    assert {item.path for item in report.skipped} == set(young)
    assert all("--min-age-seconds 60" in item.reason for item in report.skipped)
    assert temp.read_bytes() == b"PAR1 half a file"
    assert {path.name: path.read_bytes() for path in (data / "spans" / SPOOL_DIR).iterdir()} == spool_before
    writer.flush()
    writer.close()
    assert set(span_keys(data).values()) == {1} and len(span_keys(data)) == 7 * SPANS_PER_ROLLOUT


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_a_file_whose_spool_segment_is_pending_waits_for_the_replay(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 4))
    # A writer rolled trace 4's file and was killed before deleting its spool segment.
    writer = PartitionedParquetWriter(data / "spans", SPANS)
    factory = SpansFactory(data / "spans", SERVICE)
    rollout(factory, 4)
    columns = SpanColumns()
    columns.add_all(factory.records)
    writer.add(columns.take())
    writer.spool_pending()
    (segment,) = (data / "spans" / SPOOL_DIR).iterdir()
    kept = segment.read_bytes()
    (rolled,) = writer.flush()
    writer.close()
    live = SegmentName.parse(segment.name)
    assert live is not None
    dead = SegmentName(live.stamp, live.host, dead_pid(), live.writer_id, live.sequence)
    (data / "spans" / SPOOL_DIR / dead.file_name).write_bytes(kept)
    pending = rolled.rename(rolled.with_name(dead.parquet_name))
    make_old([pending])

    first = compact(data, DATE, min_age_seconds=0)
    assert first.files_read == 3 and pending.exists()
    assert [item.reason for item in first.skipped if item.path == pending] == [
        "its spool segment is still pending (a replay would write this file again)"
    ]
    assert replay_spools(data / "spans", SPANS, "zstd").rows == 0, "the file is there, so the replay writes nothing"
    second = compact(data, DATE, min_age_seconds=0)
    assert second.files_read == 2 and not pending.exists()
    keys = span_keys(data)
    assert set(keys) == expected_keys(range(1, 5)) and set(keys.values()) == {1}


def test_files_of_another_table_or_a_newer_version_are_skipped_and_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 4))
    directory = partition(data)
    spans_rows = read_table(data / "spans", "spans").slice(0, 2)
    newer = spans_rows.replace_schema_metadata(
        {SCHEMA_VERSION_KEY: str(SPANS.version + 1).encode(), TABLE_NAME_KEY: b"spans"}
    )
    pq.write_table(newer, directory / "part-newer.parquet")
    pq.write_table(FEEDBACK.schema_with_metadata().empty_table(), directory / "part-feedback.parquet")
    pq.write_table(pa.table({"x": [1]}), directory / "part-plain.parquet")
    strangers = sorted(directory.glob("part-[fnp]*.parquet"))
    before = {path: path.read_bytes() for path in strangers}
    make_old(strangers)

    report = compact(data, DATE, min_age_seconds=0)

    assert report.files_read == 3 and len(report.files_written) == 1
    reasons = {item.path.name: item.reason for item in report.skipped}
    assert f"newer than this tracelearn's ({SPANS.version})" in reasons["part-newer.parquet"]
    assert "holds the 'feedback' table" in reasons["part-feedback.parquet"]
    assert "no tracelearn.schema_version" in reasons["part-plain.parquet"]
    assert {path: path.read_bytes() for path in strangers} == before


def test_an_older_version_is_migrated_into_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    (current,) = small_files(data, range(1, 2))
    older = read_table_file(current, SPANS).replace_schema_metadata({SCHEMA_VERSION_KEY: b"0"})
    (other,) = small_files(data, range(2, 3))
    pq.write_table(older, partition(data) / "part-older.parquet")
    current.unlink()
    make_old([partition(data) / "part-older.parquet"])
    monkeypatch.setitem(MIGRATIONS, ("spans", 0), lambda table: table)

    report = compact(data, DATE, min_age_seconds=0)

    (output,) = report.files_written
    assert pq.read_metadata(output).metadata[SCHEMA_VERSION_KEY] == CURRENT and not other.exists()
    assert set(span_keys(data)) == expected_keys(range(1, 3))


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from tracelearn.collector.compaction import Step, compact

    step, nth = Step(sys.argv[2]), int(sys.argv[3])
    seen = []

    def crash(event):
        seen.append(event.step)
        if seen.count(step) == nth:
            os._exit(17)  # no cleanup at all, as after kill -9 or a power cut

    compact(Path(sys.argv[1]), sys.argv[4], min_age_seconds=0, on_event=crash)
    """
)


@pytest.mark.parametrize(
    ("step", "nth", "visible_twice"),
    [
        (Step.OUTPUT_WRITTEN, 1, 0),
        (Step.JOURNAL_WRITTEN, 1, 0),
        (Step.OUTPUT_RENAMED, 1, 6),
        (Step.INPUT_DELETED, 2, 4),
    ],
)
def test_a_crash_at_any_step_then_another_run_leaves_every_span_once(
    tmp_path: Path, step: Step, nth: int, visible_twice: int
) -> None:
    data = tmp_path / "data"
    inputs = small_files(data, range(1, 7))
    directory = partition(data)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(data), step.value, str(nth), DATE], capture_output=True, text=True
    )
    assert crashed.returncode == 17, crashed.stderr

    # What a reader sees meanwhile: no span missing; spans twice only while the journal says why.
    keys = span_keys(data)
    assert set(keys) == expected_keys(range(1, 7))
    assert sum(count - 1 for count in keys.values()) == visible_twice * SPANS_PER_ROLLOUT
    drop = superseded_inputs(directory, [path.name for path in directory.iterdir()])
    assert len(drop) == visible_twice and drop <= {path.name for path in inputs}
    plain_reader = file_keys([path for path in directory.glob("part-*.parquet") if path.name not in drop])
    assert set(plain_reader.values()) == {1} and len(plain_reader) == 6 * SPANS_PER_ROLLOUT
    assert (directory / LOCK_NAME).exists(), "the dead run's lock is still there"

    report = compact(data, DATE, min_age_seconds=0)  # takes over the dead run's lock, then recovers

    assert report.recovered, "the interrupted run is finished or rolled back first"
    keys = span_keys(data)
    assert set(keys) == expected_keys(range(1, 7)) and set(keys.values()) == {1}
    (output,) = directory.iterdir()  # no input, temp file, journal or lock left
    assert dataset_files(data / "spans") == [output]


def test_a_collector_writing_during_compaction_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 9))
    written_meanwhile: list[Path] = []
    trace = iter(range(100, 200))

    def write_a_rollout(event: CompactionEvent) -> None:
        if event.step in (Step.PLANNED, Step.INPUT_READ, Step.JOURNAL_WRITTEN, Step.OUTPUT_RENAMED):
            written_meanwhile.append(rollout_file(data, next(trace)))

    report = compact(data, DATE, min_age_seconds=0, on_event=write_a_rollout)

    assert report.files_read == 8
    assert all(path.exists() for path in written_meanwhile) and len(written_meanwhile) == 11
    keys = span_keys(data)
    assert set(keys) == expected_keys(range(1, 9)) | expected_keys(range(100, 111))
    assert set(keys.values()) == {1}


def test_a_writer_thread_rolling_files_throughout_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 5))
    stop = threading.Event()
    traces: list[int] = []

    def collector() -> None:
        trace = 1000
        while not stop.is_set() or len(traces) < 10:
            rollout_file(data, trace)
            traces.append(trace)
            trace += 1

    thread = threading.Thread(target=collector)
    thread.start()
    try:
        for _ in range(3):
            compact(data, DATE, min_age_seconds=0)
    finally:
        stop.set()
        thread.join()
    keys = span_keys(data)
    assert set(keys) == expected_keys(range(1, 5)) | expected_keys(range(1000, 1000 + len(traces)))
    assert set(keys.values()) == {1}


def test_a_second_compaction_of_the_partition_is_refused_while_one_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 4))
    reading, finish = threading.Event(), threading.Event()
    results: list[int] = []

    def slow(event: CompactionEvent) -> None:
        if event.step == Step.INPUT_READ:
            reading.set()
            finish.wait(10)

    first = threading.Thread(
        target=lambda: results.append(compact(data, DATE, min_age_seconds=0, on_event=slow).files_read)
    )
    first.start()
    assert reading.wait(10)
    try:
        with pytest.raises(
            CompactionLockedError, match=rf"a compaction of this partition is running \(pid {os.getpid()}"
        ):
            compact(data, DATE, min_age_seconds=0)
    finally:
        finish.set()
        first.join()
    assert results == [3] and not (partition(data) / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_respected_and_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inputs = small_files(data, range(1, 4))
    lock = partition(data) / LOCK_NAME
    lock.write_text('{"host": "other-box", "pid": 4242, "token": "t", "since": "2026-11-21T12:00:00+00:00"}')
    with pytest.raises(CompactionLockedError, match=r"pid 4242 on host other-box .* delete the lock file"):
        compact(data, DATE, min_age_seconds=0)
    assert all(path.exists() for path in inputs)


def test_an_input_deleted_during_the_run_is_not_brought_back(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inputs = small_files(data, range(1, 4))

    def delete_one(event: CompactionEvent) -> None:
        if event.step == Step.JOURNAL_WRITTEN:
            inputs[0].unlink()

    with pytest.raises(CompactionConflictError, match="deleted during the run"):
        compact(data, DATE, min_age_seconds=0, on_event=delete_one)
    assert sorted(p.name for p in partition(data).iterdir()) == sorted(p.name for p in inputs[1:])
    assert set(span_keys(data)) == expected_keys(range(2, 4))


def test_a_journal_it_cannot_read_stops_the_run_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 4))
    (partition(data) / "_compaction-0badc0de-000001.json").write_text('{"format": 1, "output": "../elsewhere"}')
    before = listing(partition(data))
    with pytest.raises(CompactionError, match="not a compaction journal of format 1; nothing was changed"):
        compact(data, DATE, min_age_seconds=0)
    assert listing(partition(data)) == before, "files, journal and no lock left behind"


# --- The command ------------------------------------------------------------------------------------


def test_the_command_prints_the_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 6))
    young = rollout_file(data, 6)
    result = CliRunner().invoke(main, ["spans", "compact", str(data), "--date", DATE], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for what, value in [("files read", "5"), ("rows in / out", "20 / 20"), ("duplicates removed", "0")]:
        assert any(what in line and line.rstrip(" │|").endswith(value) for line in lines), (what, result.output)
    assert f"wrote date={DATE}/service={SERVICE}/part-" in result.output
    assert any(young.name in line and "less than --min-age-seconds 60" in line for line in lines), result.output
    assert len(dataset_files(data / "spans")) == 2


def test_a_dry_run_plans_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 6))
    before = listing(partition(data))
    result = CliRunner().invoke(main, ["spans", "compact", str(data), "--date", DATE, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.output
    assert any("files to read" in line and line.rstrip(" │|").endswith("5") for line in result.output.splitlines())
    assert listing(partition(data)) == before


def test_the_command_errors_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small_files(data, range(1, 3))
    runner = CliRunner()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (partition(data) / LOCK_NAME).write_text(
            f'{{"host": "{local_host()}", "pid": {sleeper.pid}, "token": "x", "since": "2026-11-21T12:00:00+00:00"}}'
        )
        cases = {
            "no such data directory": [str(tmp_path / "missing"), "--date", DATE],
            "is not a date in the form YYYY-MM-DD": [str(data), "--date", "2026-11-31"],
            "no such partition (dates present: 2026-11-21)": [str(data), "--date", "2026-11-20"],
            f"running (pid {sleeper.pid}": [str(data), "--date", DATE, "--min-age-seconds", "0"],
        }
        for message, args in cases.items():
            result = runner.invoke(main, ["spans", "compact", *args])
            assert result.exit_code == 1, result.output
            assert result.output.startswith("Error: ") and message in result.output
            assert result.output.count("\n") == 1, result.output
    finally:
        sleeper.kill()
        sleeper.wait()
