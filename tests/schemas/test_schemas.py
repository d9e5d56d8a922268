"""Table schemas: versioned files, migrations, refusal of newer versions, generated docs."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracelearn.schemas import docs, migrations
from tracelearn.schemas.dataset import DatasetError, read_table
from tracelearn.schemas.migrations import SchemaVersionError
from tracelearn.schemas.tables import FEEDBACK, SCHEMA_VERSION_KEY, TABLE_NAME_KEY, TABLES


def feedback_rows(n: int) -> pa.Table:
    return pa.table(
        {
            "feedback_id": [f"f{i}" for i in range(n)],
            "name": ["thumbs_up"] * n,
            "value": [1.0] * n,
            "time": pa.array([1_700_000_000_000_000_000 + i for i in range(n)], pa.timestamp("ns", tz="UTC")),
        }
    )


def write_with_version(table: pa.Table, path: Path, version: int | None, name: str = "feedback") -> Path:
    metadata = {} if version is None else {SCHEMA_VERSION_KEY: str(version).encode(), TABLE_NAME_KEY: name.encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def test_every_table_records_its_version_in_parquet_metadata(tmp_path: Path) -> None:
    for spec in TABLES.values():
        path = tmp_path / f"{spec.name}.parquet"
        pq.write_table(spec.schema_with_metadata().empty_table(), path)
        metadata = pq.read_schema(path).metadata
        assert metadata[SCHEMA_VERSION_KEY] == str(spec.version).encode()
        assert read_table(path, spec.name).schema.equals(spec.schema)


def test_reader_fills_columns_missing_from_a_file(tmp_path: Path) -> None:
    path = write_with_version(feedback_rows(3), tmp_path / "f.parquet", FEEDBACK.version)
    table = read_table(path, "feedback")
    assert table.schema.names == FEEDBACK.schema.names
    assert table.column("source").null_count == 3


def test_reader_refuses_a_newer_version_naming_the_file(tmp_path: Path) -> None:
    write_with_version(feedback_rows(1), tmp_path / "future.parquet", FEEDBACK.version + 1)
    with pytest.raises(SchemaVersionError, match=r"future\.parquet.*newer.*upgrade tracelearn"):
        read_table(tmp_path, "feedback")


def test_reader_refuses_files_without_a_version(tmp_path: Path) -> None:
    path = write_with_version(feedback_rows(1), tmp_path / "plain.parquet", None)
    with pytest.raises(DatasetError, match=r"plain\.parquet.*tracelearn\.schema_version"):
        read_table(path, "feedback")


def test_reader_refuses_another_table(tmp_path: Path) -> None:
    path = write_with_version(feedback_rows(1), tmp_path / "f.parquet", 1, name="spans")
    with pytest.raises(DatasetError, match="holds the 'spans' table"):
        read_table(path, "feedback")


def test_older_versions_are_migrated_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A feedback table at version 3, whose version-1 files named the value column "score" and whose
    # version-2 files lacked a source.
    spec = type(FEEDBACK)(FEEDBACK.name, 3, FEEDBACK.schema, FEEDBACK.partition_columns)
    monkeypatch.setitem(
        migrations.MIGRATIONS,
        ("feedback", 1),
        lambda t: t.rename_columns(["value" if c == "score" else c for c in t.column_names]),
    )
    monkeypatch.setitem(
        migrations.MIGRATIONS, ("feedback", 2), lambda t: t.append_column("source", pa.array(["v2"] * t.num_rows))
    )
    old = feedback_rows(2).rename_columns(["feedback_id", "name", "score", "time"])
    migrated = migrations.migrate(old, spec, 1, "old.parquet")
    assert migrated.column("value").to_pylist() == [1.0, 1.0]
    assert migrated.column("source").to_pylist() == ["v2", "v2"]
    assert migrated.schema.metadata[SCHEMA_VERSION_KEY] == b"3"


def test_missing_migration_is_a_clear_error() -> None:
    spec = type(FEEDBACK)(FEEDBACK.name, 2, FEEDBACK.schema)
    with pytest.raises(SchemaVersionError, match="no migration for feedback from schema version 1"):
        migrations.migrate(feedback_rows(1), spec, 1, "old.parquet")


def test_generated_schema_docs_are_up_to_date() -> None:
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render(), (
        "docs/schemas.md is stale: run `python -m tracelearn.schemas.docs`"
    )
