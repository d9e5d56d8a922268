"""The filesystem registry: immutable content-addressed versions, aliases with an audit log, races, faults."""

from __future__ import annotations

import json
import multiprocessing
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.checkpoints import write_hf_checkpoint, write_lora_adapter
from support.s3_server import s3_bucket

from tracelearn.registry import (
    AliasConflictError,
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidArtifactError,
    InvalidReferenceError,
    Lineage,
    open_registry,
)
from tracelearn.registry.filesystem import FilesystemRegistry


@pytest.fixture
def registry(tmp_path: Path) -> FilesystemRegistry:
    return FilesystemRegistry(tmp_path / "registry")


def test_versions_are_numbered_content_addressed_and_immutable(registry: FilesystemRegistry, tmp_path: Path) -> None:
    first = registry.publish("checkpoint", "calc-policy", write_hf_checkpoint(tmp_path / "a", seed=1))
    second = registry.publish("checkpoint", "calc-policy", write_hf_checkpoint(tmp_path / "b", seed=2))
    again = registry.publish("checkpoint", "calc-policy", write_hf_checkpoint(tmp_path / "c", seed=1))

    assert (first.version.version, second.version.version) == (1, 2)
    assert first.created and second.created
    assert not again.created and again.version == first.version
    assert first.version.format == "hf"
    assert [v.version for v in registry.versions("calc-policy")] == [1, 2]
    assert registry.resolve("calc-policy").version == 2  # no alias given: latest
    assert registry.aliases("calc-policy") == {"latest": 2}
    stored = registry.local_path(first.version)
    assert (stored / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_lineage_and_metadata_are_kept_and_searchable(registry: FilesystemRegistry, tmp_path: Path) -> None:
    lineage = Lineage(dataset="/data/transitions", partitions=("date=2026-11-20",), pipeline_config_hash="abc123",
                      training_run_id="run-42", parent="calc-policy@1", metrics={"success": 0.75},
                      code_revision="deadbeef")
    registry.publish("checkpoint", "calc-policy", write_hf_checkpoint(tmp_path / "a", seed=1))
    published = registry.publish("checkpoint", "calc-policy", write_hf_checkpoint(tmp_path / "b", seed=2),
                                 lineage=lineage, metadata={"task": "calc"})

    reread = FilesystemRegistry(registry.location).version("calc-policy", 2)
    assert reread.lineage == lineage and reread.metadata == {"task": "calc"}
    assert [v.ref for v in registry.search({"training_run_id": "run-42"})] == ["calc-policy@2"]
    assert [v.ref for v in registry.search({"task": "calc", "metrics.success": "0.75"})] == ["calc-policy@2"]
    assert [v.ref for v in registry.search({"partitions": "date=2026-11-20"})] == ["calc-policy@2"]
    assert registry.search({"task": "other"}) == []
    assert published.version == reread


def test_a_lora_adapter_records_its_base_model(registry: FilesystemRegistry, tmp_path: Path) -> None:
    version = registry.publish("checkpoint", "calc-lora", write_lora_adapter(tmp_path / "lora", "smollm2")).version
    assert version.format == "lora"
    assert version.lineage.base_model == "smollm2"

    with pytest.raises(InvalidArtifactError, match="base model"):
        registry.publish("checkpoint", "calc-lora", write_lora_adapter(tmp_path / "nobase", None))


def test_invalid_checkpoints_and_prompts_are_refused(registry: FilesystemRegistry, tmp_path: Path) -> None:
    no_weights = write_hf_checkpoint(tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InvalidArtifactError, match="no weights"):
        registry.publish("checkpoint", "p", no_weights)

    truncated = write_hf_checkpoint(tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidArtifactError, match="truncated"):
        registry.publish("checkpoint", "p", truncated)

    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InvalidArtifactError, match="empty"):
        registry.publish("prompt", "s", tmp_path / "empty.txt")
    with pytest.raises(InvalidReferenceError, match="invalid artifact name"):
        registry.publish_prompt("bad name!", "hello")

    registry.publish_prompt("calc-system", "You are a calculator.")
    with pytest.raises(InvalidArtifactError, match="holds prompts"):
        registry.publish("checkpoint", "calc-system", write_hf_checkpoint(tmp_path / "ok"))
    assert registry.names() == ["calc-system"]


def test_promote_records_the_previous_holder_and_rollback_undoes_promotions(registry: FilesystemRegistry) -> None:
    for text in ("one", "two", "three"):
        registry.publish_prompt("calc-system", text)

    assert registry.promote("calc-system", 1, "production").previous is None
    move = registry.promote("calc-system", 3, "production", reason="better eval")
    assert (move.version, move.previous, move.sequence, move.reason) == (3, 1, 2, "better eval")
    registry.promote("calc-system", 2, "candidate")
    assert registry.aliases("calc-system") == {"production": 3, "candidate": 2, "latest": 3}
    assert registry.read_prompt("calc-system@production") [1] == "three"

    back = registry.rollback("calc-system", "production")
    assert (back.version, back.previous, back.rollback) == (1, 3, True)
    assert registry.resolve("calc-system@production").version == 1
    with pytest.raises(ArtifactNotFoundError, match="no earlier version"):
        registry.rollback("calc-system", "production")
    history = [(m.alias, m.version, m.rollback) for m in registry.alias_moves("calc-system", "production")]
    assert history == [("production", 1, False), ("production", 3, False), ("production", 1, True)]


def test_unknown_names_aliases_and_versions_give_clear_errors(registry: FilesystemRegistry) -> None:
    registry.publish_prompt("calc-system", "hello")
    with pytest.raises(ArtifactNotFoundError, match="no artifact named 'nope'"):
        registry.resolve("nope@production")
    with pytest.raises(ArtifactNotFoundError, match=r"no alias .production.*registry promote calc-system"):
        registry.resolve("calc-system@production")
    with pytest.raises(ArtifactNotFoundError, match="no version 9"):
        registry.resolve("calc-system@9")
    with pytest.raises(ArtifactNotFoundError, match="no version 9"):
        registry.promote("calc-system", 9, "production")
    with pytest.raises(InvalidReferenceError, match="latest"):
        registry.promote("calc-system", 1, "latest")


def test_a_concurrent_move_is_a_conflict_not_an_override(tmp_path: Path) -> None:
    one, other = FilesystemRegistry(tmp_path / "r"), FilesystemRegistry(tmp_path / "r")
    one.publish_prompt("s", "a")
    one.publish_prompt("s", "b")
    seen = len(other.alias_moves("s", "production"))
    one.promote("s", 1, "production")
    with pytest.raises(AliasConflictError, match="moved since it was read"):
        other.promote("s", 2, "production", expected_sequence=seen)
    assert other.resolve("s@production").version == 1


def test_a_corrupted_file_is_detected_on_load(registry: FilesystemRegistry, tmp_path: Path) -> None:
    version = registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "a")).version
    stored = registry.local_path(version) / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"m@1.*model.safetensors has SHA-256"):
        registry.local_path(version)
    assert registry.local_path(version, verify=False) == stored.parent


def test_a_version_without_its_manifest_is_invisible_and_its_number_is_not_reused(
        registry: FilesystemRegistry, tmp_path: Path) -> None:
    registry.publish_prompt("s", "one")
    torn = Path(registry.location) / "s" / "versions" / "2"
    (torn / "files").mkdir(parents=True)
    (torn / "claim.json").write_text("{}")
    (torn / "files" / "prompt.txt").write_text("half")  # a publisher died here, before version.json

    assert [v.version for v in registry.versions("s")] == [1]
    assert registry.publish_prompt("s", "three").version.version == 3


def _publish_many(location: str, worker: int, count: int, start: multiprocessing.synchronize.Barrier) -> None:
    registry = FilesystemRegistry(location)
    start.wait()
    for index in range(count):
        registry.publish_prompt("race", f"worker {worker} prompt {index}")


def _promote_once(location: str, version: int, start: multiprocessing.synchronize.Barrier,
                  results: multiprocessing.Queue[str]) -> None:
    registry = FilesystemRegistry(location)
    start.wait()
    try:
        registry.promote("race", version, "production")
        results.put(f"ok {version}")
    except AliasConflictError:
        results.put("conflict")


def test_concurrent_publishers_and_promoters_in_separate_processes(tmp_path: Path) -> None:
    location = str(tmp_path / "registry")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    workers = [context.Process(target=_publish_many, args=(location, worker, 8, start)) for worker in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0

    registry = FilesystemRegistry(location)
    versions = registry.versions("race")
    assert [v.version for v in versions] == list(range(1, 33))
    assert len({registry.read_prompt(v.ref)[1] for v in versions}) == 32

    start = context.Barrier(6)
    results: multiprocessing.Queue[str] = context.Queue()
    promoters = [context.Process(target=_promote_once, args=(location, version, start, results))
                 for version in range(1, 7)]
    for promoter in promoters:
        promoter.start()
    for promoter in promoters:
        promoter.join(60)
    outcomes = [results.get(timeout=5) for _ in promoters]
    moves = FilesystemRegistry(location).alias_moves("race", "production")
    # Every success is in the log exactly once, sequences have no gaps, and the holder is the last move.
    assert sorted(f"ok {m.version}" for m in moves) == sorted(o for o in outcomes if o.startswith("ok"))
    assert [m.sequence for m in moves] == list(range(1, len(moves) + 1))
    assert FilesystemRegistry(location).resolve("race@production").version == moves[-1].version


def test_a_disk_that_refuses_writes_gives_one_clear_error_and_no_partial_version(tmp_path: Path) -> None:
    location = tmp_path / "registry"
    registry = FilesystemRegistry(location)
    registry.publish_prompt("s", "one")
    (tmp_path / "p.txt").write_text("two")

    def no_file_writes() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    completed = subprocess.run(
        [str(Path(sys.executable).parent / "tracelearn"), "registry", "publish", "prompt", "s", str(tmp_path / "p.txt"),
         "--registry", str(location)],
        capture_output=True, text=True, preexec_fn=no_file_writes, check=False, timeout=60,
    )
    assert completed.returncode == 1
    assert "cannot write to the registry" in completed.stderr and "nothing was published" in completed.stderr
    assert "Traceback" not in completed.stderr

    assert [v.version for v in FilesystemRegistry(location).versions("s")] == [1]
    assert registry.publish_prompt("s", "two").version.version == 2  # no hole left behind


@pytest.fixture
def s3_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FilesystemRegistry]:
    with s3_bucket(monkeypatch, "registry-test"):
        yield FilesystemRegistry("s3://registry-test/registry", cache_dir=tmp_path / "cache")


def test_the_registry_works_on_object_storage(s3_registry: FilesystemRegistry, tmp_path: Path) -> None:
    first = s3_registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "a", seed=1)).version
    second = s3_registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "b", seed=2)).version
    assert not s3_registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "c", seed=1)).created
    s3_registry.promote("m", 1, "production")
    s3_registry.promote("m", 2, "production")
    assert s3_registry.rollback("m", "production").version == 1

    other = open_registry("s3://registry-test/registry")
    assert other.resolve("m@production") == first
    local = s3_registry.local_path(second)
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((local / "config.json").read_text())["model_type"] == "qwen2"

    (local / "config.json").write_text("{}")
    with pytest.raises(CorruptArtifactError, match=r"config\.json"):
        s3_registry.local_path(second)


def test_racing_promotions_on_object_storage_leave_one_winner_per_move(s3_registry: FilesystemRegistry) -> None:
    for text in ("a", "b", "c", "d"):
        s3_registry.publish_prompt("s", text)
    start = threading.Barrier(4)
    outcomes: list[str] = []

    def promote(version: int) -> None:
        registry = FilesystemRegistry(s3_registry.location)
        start.wait()
        try:
            registry.promote("s", version, "production")
            outcomes.append(f"ok {version}")
        except AliasConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=promote, args=(version,)) for version in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    moves = FilesystemRegistry(s3_registry.location).alias_moves("s", "production")
    assert len(outcomes) == 4 and moves
    assert sorted(f"ok {m.version}" for m in moves) == sorted(o for o in outcomes if o.startswith("ok"))
    assert [m.sequence for m in moves] == list(range(1, len(moves) + 1))
