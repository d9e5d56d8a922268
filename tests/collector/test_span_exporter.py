"""The in-process Parquet exporter behind our batch processor, with the real OpenTelemetry SDK."""

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from support.capture import capture_settings, installed_capture

from tracelearn.collector.span_exporter import ParquetSpanExporter
from tracelearn.collector.spool import SPOOL_DIR, read_segment
from tracelearn.instrumentation.span_processors import DurableBatchSpanProcessor
from tracelearn.schemas.dataset import dataset_files, read_table
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, SPANS
from tracelearn.storage.atomic_files import TEMP_SUFFIX, path_segment_safe


def span_rows(data: Path) -> list[dict[str, object]]:
    """Rows as dicts; nanosecond timestamps have no datetime equivalent, so they are left out."""
    return read_table(data / "spans", "spans").drop_columns(["start_time", "end_time", "events"]).to_pylist()


def spans_files(data: Path) -> list[Path]:
    root = data / "spans"
    return dataset_files(root) if root.exists() else []


def test_spans_land_in_hive_partitions_with_hex_ids_and_version(tmp_path: Path) -> None:
    with installed_capture(tmp_path, service="calc agent/v1"):
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("root") as root, tracer.start_as_current_span("child"):
            pass
    files = spans_files(tmp_path)
    assert files, "no Parquet file written"
    date = time.strftime("%Y-%m-%d", time.gmtime())
    # Not a plain name: its directory is a readable prefix and a digest, so "calc_agent_v1" gets another one.
    assert files[0].parent == tmp_path / "spans" / f"date={date}" / f"service={path_segment_safe('calc agent/v1')}"
    assert files[0].parent.name.startswith("service=calc_agent_v1~")
    assert pq.read_schema(files[0]).metadata[SCHEMA_VERSION_KEY] == str(SPANS.version).encode()
    rows = {row["name"]: row for row in span_rows(tmp_path)}
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert rows["root"]["trace_id"] == trace_id and len(rows["root"]["span_id"]) == 16
    assert rows["child"]["parent_span_id"] == rows["root"]["span_id"]
    assert rows["root"]["rollout_id"] == trace_id  # one trace is one rollout by default
    assert rows["root"]["service_name"] == "calc agent/v1"


def spool_segments(data: Path) -> list[Path]:
    spool = data / "spans" / SPOOL_DIR
    return sorted(spool.glob("spool-*.arrows")) if spool.exists() else []


def spooled_span_names(data: Path) -> list[str]:
    return [
        name
        for segment in spool_segments(data)
        for batches in read_segment(segment, partition_width=2).batches.values()
        for batch in batches
        for name in batch.column("name").to_pylist()
    ]


def test_the_end_of_a_root_span_is_on_disk_in_the_spool_without_waiting_for_shutdown(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_SECONDS=3600):
        with trace.get_tracer("test").start_as_current_span("rollout"):
            pass
        deadline = time.monotonic() + 5
        while not spooled_span_names(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spooled_span_names(tmp_path) == ["rollout"], "the end of a rollout appends it to the spool, fsynced"
        assert not spans_files(tmp_path), "Parquet files are written at the roll (size, age) or shutdown"
    assert [row["name"] for row in span_rows(tmp_path)] == ["rollout"]
    assert not spool_segments(tmp_path), "the roll at shutdown deletes the segment it wrote"


def test_a_new_exporter_replays_what_an_exited_agent_spooled_and_leaves_live_spools_alone(tmp_path: Path) -> None:
    exited_agent = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from pathlib import Path
        from opentelemetry import trace
        from support.capture import installed_capture

        with installed_capture(Path({str(tmp_path)!r})) as (provider, _, _):
            with trace.get_tracer("test").start_as_current_span("flushed-then-killed"):
                pass
            provider.force_flush()
            os._exit(0)  # no shutdown: the rollout is only in the spool
        """
    )
    subprocess.run([sys.executable, "-c", exited_agent], check=True)
    with installed_capture(tmp_path) as (provider, _, _):
        with trace.get_tracer("test").start_as_current_span("live"):
            pass
        provider.force_flush()
        ParquetSpanExporter(capture_settings(tmp_path)).shutdown()
        assert [row["name"] for row in span_rows(tmp_path)] == ["flushed-then-killed"]
        assert spooled_span_names(tmp_path) == ["live"], "a live writer's spool is never replayed"
    assert sorted(row["name"] for row in span_rows(tmp_path)) == ["flushed-then-killed", "live"]
    assert not spool_segments(tmp_path)


def test_files_roll_by_size(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_BYTES=20_000) as (_, processor, _exporter):
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("root"):
            for i in range(300):
                with tracer.start_as_current_span("step", attributes={"payload": "x" * 500, "i": i}):
                    pass
                if i % 50 == 0:
                    processor.force_flush()
            before_end = len(spans_files(tmp_path))
    assert before_end >= 3, "buffers above TRACELEARN_ROLL_BYTES should have rolled into files"
    assert len(read_table(tmp_path / "spans", "spans")) == 301


def test_files_roll_by_age(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_SECONDS=0.2):
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("long-running-root"):
            with tracer.start_as_current_span("early"):
                pass
            deadline = time.monotonic() + 5
            while not spans_files(tmp_path) and time.monotonic() < deadline:
                with tracer.start_as_current_span("tick"):  # the next export notices the age
                    pass
                time.sleep(0.25)
            assert spans_files(tmp_path), "an old buffer should roll into a file while the root is open"


def test_an_idle_agents_last_rollout_rolls_by_age(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_SECONDS=0.2):
        with trace.get_tracer("test").start_as_current_span("last-rollout"):
            pass
        deadline = time.monotonic() + 5
        while not spans_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)  # no spans arrive: the roll thread notices the age
        assert [row["name"] for row in span_rows(tmp_path)] == ["last-rollout"]
        assert not spool_segments(tmp_path)


def test_a_forked_worker_that_ends_without_shutdown_lands_its_rollouts_through_the_parent(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_ROLL_SECONDS=0.2) as (provider, _, _):
        with trace.get_tracer("test").start_as_current_span("parent-rollout"):
            pass
        provider.force_flush()
        pid = os.fork()
        if pid == 0:  # a pool worker: its own rollout, then the pool ends it with os._exit
            with trace.get_tracer("test").start_as_current_span("worker-rollout"):
                pass
            os._exit(0 if provider.force_flush() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        deadline = time.monotonic() + 5
        while len(spans_files(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the parent's roll thread replays the worker's spool
        assert sorted(row["name"] for row in span_rows(tmp_path)) == ["parent-rollout", "worker-rollout"]
    assert sorted(row["name"] for row in span_rows(tmp_path)) == ["parent-rollout", "worker-rollout"]


def test_two_writers_sharing_a_dataset_never_clobber_each_other(tmp_path: Path) -> None:
    for _ in range(2):
        with installed_capture(tmp_path):
            with trace.get_tracer("test").start_as_current_span("rollout"):
                pass
    files = spans_files(tmp_path)
    assert len(files) == 2 and files[0].name != files[1].name
    assert len(read_table(tmp_path / "spans", "spans")) == 2


def test_huge_and_non_utf8_attributes_are_kept_readable(tmp_path: Path) -> None:
    with installed_capture(tmp_path, TRACELEARN_MAX_ATTRIBUTE_BYTES=1000) as (_, _, exporter):
        with trace.get_tracer("test").start_as_current_span(
            "odd", attributes={"huge": "y" * 50_000, "bad": b"\xff\xfe".decode("utf-8", "surrogateescape")}
        ):
            pass
    row = span_rows(tmp_path)[0]
    attributes = dict(row["attributes"])
    assert len(attributes["huge"]) == 1000
    assert attributes["bad"] == "??"
    assert exporter.columns.truncated_values == 1


def test_an_unwritable_data_directory_never_breaks_the_agent_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    with caplog.at_level(logging.ERROR), installed_capture(blocker) as (provider, _, exporter):
        tracer = trace.get_tracer("test")
        for i in range(3):
            with tracer.start_as_current_span(f"rollout-{i}"):
                pass
            provider.force_flush()
        errors = [r for r in caplog.records if "spans stay buffered" in r.getMessage()]
        assert len(errors) == 1, "the failure is logged once, not once per flush"
        assert exporter.writer.buffered_rows == 3
        blocker.unlink()  # the operator fixes the disk
        provider.force_flush()
    assert sorted(read_table(blocker / "spans", "spans").column("name").to_pylist()) == [
        "rollout-0",
        "rollout-1",
        "rollout-2",
    ]
    assert not list(blocker.rglob(f"*{TEMP_SUFFIX}"))


class BlockedExporter(SpanExporter):
    """An exporter that cannot keep up (stands for a stalled disk), to fill the queue for real."""

    def __init__(self) -> None:
        self.exported = 0
        self.release = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        while not self.release:
            time.sleep(0.01)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def test_a_full_queue_blocks_briefly_then_counts_and_reports_drops(caplog: pytest.LogCaptureFixture) -> None:
    exporter = BlockedExporter()
    processor = DurableBatchSpanProcessor(exporter, max_queue_size=20, max_export_batch_size=5, block_millis=5)
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        for i in range(100):
            tracer.start_span(f"s{i}").end()
        elapsed = time.monotonic() - started
        exporter.release = True
        provider.shutdown()
    assert processor.dropped > 0
    assert exporter.exported + processor.dropped == 100
    assert elapsed < 5, "a full queue may block briefly, never indefinitely"
    assert sum("dropping spans and counting them" in r.getMessage() for r in caplog.records) == 1
    assert any(f"{processor.dropped} spans were dropped" in r.getMessage() for r in caplog.records)
