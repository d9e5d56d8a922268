"""Spans schema versions 2 (sampling parameters, messages_problem) and 3 (model_version): older files still
read, and transitions version 2 (sampling parameters, model_version): version-1 files still read."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracelearn.schemas.dataset import read_table
from tracelearn.schemas.tables import SCHEMA_VERSION_KEY, SPANS, TABLE_NAME_KEY

ADDED_IN_2 = ["request_temperature", "request_top_p", "request_top_k", "messages_problem"]
ADDED_IN_3 = ["model_version"]


def test_a_version_1_spans_file_reads_with_the_new_columns_null(tmp_path: Path) -> None:
    assert SPANS.version == 3
    v1_schema = pa.schema([field for field in SPANS.schema if field.name not in [*ADDED_IN_2, *ADDED_IN_3]])
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
    assert all(migrated.column(name).null_count == 2 for name in [*ADDED_IN_2, *ADDED_IN_3])


def test_a_dataset_with_version_1_and_version_2_files_builds_without_a_rewrite(tmp_path: Path) -> None:
    # A user upgrades tracelearn: yesterday's spans (version 1) and today's (version 2) build together.
    from support.spans_factory import SpansFactory

    from tracelearn.pipelines.build import build_transitions
    from tracelearn.pipelines.spans_input import scan_spans

    factory = SpansFactory(tmp_path / "data" / "spans")
    root = factory.root(1, 0, 4, task_id="t-1")
    factory.llm(1, root, 1, "What is 2 plus 2?", task_id="t-1")
    factory.reward(1, root, 3, 1.0, task_id="t-1")
    (written,) = factory.write()
    v1 = pq.read_table(written)
    v1 = v1.drop_columns([*ADDED_IN_2, *ADDED_IN_3])
    v1 = v1.replace_schema_metadata({SCHEMA_VERSION_KEY: b"1", TABLE_NAME_KEY: b"spans"})
    pq.write_table(v1, written)
    today = SpansFactory(tmp_path / "data" / "spans")
    root = today.root(2, 10, 14, task_id="t-1")
    today.llm(2, root, 11, "What is 2 plus 2?", task_id="t-1")
    today.reward(2, root, 13, 0.0, task_id="t-1")
    today.write()

    spans = scan_spans(tmp_path / "data").collect()
    assert spans.height == 6 and spans.get_column("request_temperature").null_count() == 6
    result = build_transitions(tmp_path / "data", tmp_path / "out")
    assert result.summary["rollouts"] == 2 and result.summary["transitions"] == 2


def test_an_older_file_missing_a_column_its_version_had_is_still_refused(tmp_path: Path) -> None:
    import pytest

    from tracelearn.pipelines.spans_input import scan_spans
    from tracelearn.schemas.dataset import DatasetError

    v1_schema = pa.schema(
        [field for field in SPANS.schema if field.name not in [*ADDED_IN_2, *ADDED_IN_3, "reward"]]
    )
    table = pa.table({field.name: pa.nulls(0, field.type) for field in v1_schema}, schema=v1_schema)
    directory = tmp_path / "spans" / "date=2026-01-01" / "service=a"
    directory.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: b"1", TABLE_NAME_KEY: b"spans"}),
                   directory / "part-0.parquet")
    with pytest.raises(DatasetError, match="column 'reward' is missing"):
        scan_spans(tmp_path)


def test_a_version_2_spans_file_builds_beside_version_3_with_model_version_null(tmp_path: Path) -> None:
    from support.spans_factory import SpansFactory

    from tracelearn.pipelines.build import build_transitions
    from tracelearn.pipelines.spans_input import scan_spans
    from tracelearn.pipelines.stats import scan_transitions

    yesterday = SpansFactory(tmp_path / "data" / "spans")
    root = yesterday.root(1, 0, 4, task_id="t-1")
    yesterday.llm(1, root, 1, "What is 2 plus 2?", task_id="t-1")
    yesterday.reward(1, root, 3, 1.0, task_id="t-1")
    (written,) = yesterday.write()
    v2 = pq.read_table(written).drop_columns(ADDED_IN_3)
    pq.write_table(v2.replace_schema_metadata({SCHEMA_VERSION_KEY: b"2", TABLE_NAME_KEY: b"spans"}), written)
    today = SpansFactory(tmp_path / "data" / "spans")
    root = today.root(2, 10, 14, task_id="t-1")
    call = today.llm(2, root, 11, "What is 2 plus 2?", task_id="t-1")
    today.records[-1].attributes = {**today.records[-1].attributes, "tracelearn.model.version": "calc@2+abc"}
    today.reward(2, root, 13, 0.0, task_id="t-1")
    today.write()

    spans = scan_spans(tmp_path / "data").collect()
    versions = spans.filter((spans["trace_id"] == format(2, "032x")) & (spans["span_id"] == format(call, "016x")))[
        "model_version"
    ].to_list()
    assert versions == ["calc@2+abc"] and spans["model_version"].null_count() == 5
    build_transitions(tmp_path / "data", tmp_path / "out")
    transitions, _ = scan_transitions(tmp_path / "out")
    assert sorted(transitions.collect()["model_version"].to_list(), key=str) == [None, "calc@2+abc"]


def test_a_version_1_transitions_file_still_reads_with_the_sampling_columns_null(tmp_path: Path) -> None:
    from tracelearn.pipelines.stats import scan_transitions
    from tracelearn.schemas.tables import TRANSITIONS
    from tracelearn.training.data import load_training_data

    assert TRANSITIONS.version == 2
    added = ["temperature", "top_p", "top_k", "model_version"]
    v1_schema = pa.schema([field for field in TRANSITIONS.schema if field.name not in added])
    rows = {field.name: pa.nulls(2, field.type) for field in v1_schema}
    rows.update(
        rollout_id=pa.array(["r1", "r2"]),
        step_index=pa.array([0, 0], pa.int32()),
        reward=pa.array([1.0, 0.0]),
        pipeline_config_hash=pa.array(["h" * 64, "h" * 64]),
    )
    table = pa.table(rows, schema=v1_schema).replace_schema_metadata(
        {SCHEMA_VERSION_KEY: b"1", TABLE_NAME_KEY: b"transitions"}
    )
    directory = tmp_path / "transitions" / "date=2026-01-01"
    directory.mkdir(parents=True)
    pq.write_table(table, directory / f"part-{'h' * 16}.parquet")

    assert read_table(tmp_path / "transitions", "transitions").schema.equals(TRANSITIONS.schema)
    frame, _ = scan_transitions(tmp_path)
    collected = frame.collect()
    assert collected.height == 2 and all(collected[name].null_count() == 2 for name in added)
    assert load_training_data(tmp_path).frame.height == 2
