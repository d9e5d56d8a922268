"""Spans schema version 2 (sampling parameters, messages_problem): version-1 files still read."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.schemas.dataset import read_table
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, SPANS, TABLE_NAME_KEY

ADDED_IN_2 = ["request_temperature", "request_top_p", "request_top_k", "messages_problem"]


def test_a_version_1_spans_file_reads_with_the_new_columns_null(tmp_path: Path) -> None:
    assert SPANS.version == 2
    v1_schema = pa.schema([field for field in SPANS.schema if field.name not in ADDED_IN_2])
    rows = {field.name: pa.nulls(2, field.type) for field in v1_schema}
    rows.update(
        trace_id=pa.array(["0" * 32, "1" * 32]),
        span_id=pa.array(["a" * 16, "b" * 16]),
        name=pa.array(["openai.chat", "openai.chat"]),
        start_time=pa.array([1, 2], pa.timestamp("ns", tz="UTC")),
        end_time=pa.array([3, 4], pa.timestamp("ns", tz="UTC")),
        input_tokens=pa.array([10, 20], pa.int64()),
    )
    table = pa.table(rows, schema=v1_schema).replace_schema_metadata(
        {SCHEMA_VERSION_KEY: b"1", TABLE_NAME_KEY: b"spans"}
    )
    pq.write_table(table, tmp_path / "part-0.parquet")

    migrated = read_table(tmp_path, "spans")

    assert migrated.schema.equals(SPANS.schema)
    assert migrated.column("input_tokens").to_pylist() == [10, 20]
    assert all(migrated.column(name).null_count == 2 for name in ADDED_IN_2)
