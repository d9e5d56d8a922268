"""The same build reads a spans dataset from object storage (S3 protocol, a local S3-compatible server)."""

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest
from support.s3_server import s3_bucket
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.spans_input import scan_spans, spans_dates
from tracelearn.schemas.dataset import DatasetError

BUCKET = "tracelearn-test"
NOW = at(3600)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[pafs.FileSystem]:
    with s3_bucket(monkeypatch, BUCKET) as filesystem:
        yield filesystem


def write_local_spans(data: Path) -> None:
    factory = SpansFactory(data / "spans")
    for trace, (task, value) in enumerate([("t1", 1.0), ("t1", 0.0), ("t2", 0.5)], start=1):
        root = factory.root(trace, 0, 100, task_id=task)
        factory.llm(trace, root, 1, user=f"{task}: 2+2?", task_id=task, agent="planner")
        factory.llm(trace, root, 3, user=f"{task}: and then?", task_id=task, agent="writer")
        factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


def upload(local: Path, filesystem: pafs.FileSystem, prefix: str) -> None:
    pafs.copy_files(str(local), prefix, destination_filesystem=filesystem)


def test_a_build_from_s3_writes_what_a_local_build_writes(s3: pafs.FileSystem, tmp_path: Path) -> None:
    local = tmp_path / "data"
    write_local_spans(local)
    upload(local, s3, f"{BUCKET}/data")

    remote = build_transitions(f"s3://{BUCKET}/data", tmp_path / "from-s3", now=NOW, bucket_bytes=500)
    here = build_transitions(local, tmp_path / "from-disk", now=NOW, bucket_bytes=500)

    assert remote.summary == here.summary and remote.summary["transitions"] == 6
    assert remote.summary["buckets"] > 1, "the bucketed path reads from object storage too"
    for ours, theirs in zip(remote.transitions_files, here.transitions_files, strict=True):
        assert pl.read_parquet(ours).equals(pl.read_parquet(theirs))
    assert spans_dates(f"s3://{BUCKET}/data") == ["2026-11-21"]
    assert scan_spans(f"s3://{BUCKET}/data/spans").select(pl.len()).collect().item() == 12


def test_a_missing_prefix_is_a_dataset_error(s3: pafs.FileSystem, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"s3://{BUCKET}/nowhere"):
        build_transitions(f"s3://{BUCKET}/nowhere", tmp_path / "out", now=NOW)
