"""A spans file with the right schema metadata but columns that are not the schema's is refused up
front, naming the file and the column: never a polars traceback mid-build."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.spans_factory import SpansFactory

from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.schemas.dataset import DatasetError

TRACELEARN = str(Path(sys.executable).parent / "tracelearn")


def dataset_with_a_forged_file(root: Path, forge: Callable[[pa.Table], pa.Table]) -> Path:
    """A good spans dataset plus one file next to its first, rewritten by ``forge`` with the original
    Parquet metadata (schema version and table name) kept."""
    factory = SpansFactory(root / "spans")
    task = factory.span(1, "calc.task", 0, 10, attributes={"tracelearn.task.id": "t1"})
    factory.llm(1, task, 1, "what is 6*7?")
    (good,) = factory.write()
    table = pq.read_table(good)
    forged = forge(table.replace_schema_metadata(None)).replace_schema_metadata(table.schema.metadata)
    path = good.with_name("forged.parquet")
    pq.write_table(forged, path)
    return path


def retyped(column: str, dtype: pa.DataType) -> Callable[[pa.Table], pa.Table]:
    def forge(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index(column)
        try:
            values = table.column(column).cast(dtype)
        except pa.ArrowNotImplementedError:  # a nested column: the values do not matter, the type does
            values = pa.nulls(table.num_rows, dtype)
        return table.set_column(index, pa.field(column, dtype), values)

    return forge


def test_a_column_of_another_type_is_refused_by_the_cli_naming_file_and_column(tmp_path: Path) -> None:
    forged = dataset_with_a_forged_file(tmp_path, retyped("reward", pa.string()))
    completed = subprocess.run(
        [TRACELEARN, "transitions", "build", "--spans", str(tmp_path), "--out", str(tmp_path / "out"),
         "--lateness-seconds", "0"], capture_output=True, text=True, check=False, timeout=300,
    )
    assert completed.returncode == 1
    assert f"{forged}: column 'reward' is string, but the spans schema (version" in completed.stderr
    assert "has double" in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (retyped("start_time", pa.int64()), r"column 'start_time' is int64, but the spans schema .* has timestamp"),
        (retyped("events", pa.list_(pa.string())), r"column 'events' is list<\w+: string>, but"),
        (lambda table: table.drop_columns(["attributes"]), r"column 'attributes' is missing"),
        (lambda table: table.append_column("extra", pa.array(["x"] * table.num_rows)),
         r"column 'extra' is not in the spans schema"),
    ],
)
def test_columns_that_are_not_the_schemas_are_named(
        tmp_path: Path, forge: Callable[[pa.Table], pa.Table], message: str) -> None:
    forged = dataset_with_a_forged_file(tmp_path, forge)
    with pytest.raises(DatasetError, match=rf"^{forged}: {message}"):
        scan_spans(tmp_path)
