"""The MLflow registry backend against a real ``mlflow server`` (SQLite store, artifacts proxied over HTTP).

One server serves the module; each test uses its own artifact names and download cache. The server
takes about 6 s to start and every registry call is a few HTTP requests, so the module takes 25-35 s
on a loaded two-core machine: marked slow.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from safetensors.numpy import save_file
from support.mlflow_server import MlflowServer
from support.tiny_model import build_tiny_model

from tracelearn.registry import (
    AliasConflictError,
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidArtifactError,
    InvalidReferenceError,
    Lineage,
    RegistryError,
    open_registry,
)
from tracelearn.registry.mlflow_backend import MlflowRegistry
from tracelearn.serving.alias_follower import AliasFollower

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        print(f"mlflow server started in {server.startup_seconds:.1f} s")
        yield server


@pytest.fixture
def registry(mlflow_server: MlflowServer, tmp_path: Path) -> MlflowRegistry:
    return MlflowRegistry(mlflow_server.url, cache_dir=tmp_path / "cache")


@pytest.fixture
def name() -> str:
    return f"calc-{uuid.uuid4().hex[:8]}"


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A minimal valid Hugging Face directory: config, tokenizer, a real safetensors file, a nested file."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    weights = np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)
    save_file({"embed.weight": weights}, str(directory / "model.safetensors"))
    (directory / "extra").mkdir()
    (directory / "extra" / "generation_config.json").write_text("{}")
    return directory


def test_checkpoint_publish_is_content_addressed_and_downloads_verified(
        registry: MlflowRegistry, name: str, tmp_path: Path) -> None:
    source = tiny_checkpoint(tmp_path / "ckpt")
    lineage = Lineage(dataset="s3://spans", partitions=("date=2026-11-20",), metrics={"reward": 0.75},
                      training_run_id="run-1")
    first = registry.publish("checkpoint", name, source, lineage=lineage, metadata={"team": "rl"})
    assert first.created and first.version.version == 1 and first.version.format == "hf"
    again = registry.publish("checkpoint", name, source)
    assert not again.created and again.version == first.version

    second = registry.publish("checkpoint", name, tiny_checkpoint(tmp_path / "ckpt2", seed=1))
    assert second.created and second.version.version == 2
    assert [v.version for v in registry.versions(name)] == [1, 2]
    assert registry.resolve(name).version == 2
    assert registry.version(name, 1).lineage == lineage
    assert name in registry.names()

    local = registry.local_path(first.version)
    assert (local / "extra" / "generation_config.json").read_text() == "{}"
    assert (local / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert local.name == first.version.digest

    # MLflow's own view: version 1 of a registered model, its source the run's files, tags readable.
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    model_version = client.get_model_version(name, "1")
    assert model_version.tags["tracelearn.digest"] == first.version.digest
    assert model_version.source.endswith("/files")


def test_corrupted_cached_file_is_detected(registry: MlflowRegistry, name: str, tmp_path: Path) -> None:
    published = registry.publish("checkpoint", name, tiny_checkpoint(tmp_path / "ckpt")).version
    local = registry.local_path(published)
    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"model\.safetensors"):
        registry.local_path(published)
    assert registry.local_path(published, verify=False) == local  # the caller asked not to re-hash


def test_a_file_added_to_the_download_cache_is_refused(registry: MlflowRegistry, name: str, tmp_path: Path) -> None:
    published = registry.publish("checkpoint", name, tiny_checkpoint(tmp_path / "ckpt")).version
    local = registry.local_path(published)
    (local / "adapter_config.json").write_text('{"base_model_name_or_path": "other"}')
    with pytest.raises(CorruptArtifactError, match=r"holds adapter_config\.json, not in the version's manifest"):
        registry.local_path(published)


def test_an_alias_that_reads_as_a_version_is_refused(registry: MlflowRegistry, name: str) -> None:
    registry.publish_prompt(name, "one")
    registry.publish_prompt(name, "two")
    with pytest.raises(InvalidReferenceError, match=r"invalid alias 'v2': it reads as a version number"):
        registry.promote(name, 1, "v2")
    assert registry.alias_moves(name) == []
    assert registry.aliases(name) == {"latest": 2}


def test_prompt_versions_aliases_and_mlflow_prompt_registry(registry: MlflowRegistry, name: str) -> None:
    v1 = registry.publish_prompt(name, "You are a calculator. Answer {{question}}.\n")
    v2 = registry.publish_prompt(name, "Think step by step, then answer. ✓\n", metadata={"optimizer": "apo"})
    assert (v1.version.version, v2.version.version) == (1, 2)
    assert not registry.publish_prompt(name, "You are a calculator. Answer {{question}}.\n").created

    registry.promote(name, 1, "production", reason="first release")
    version, text = registry.read_prompt(f"{name}@production")
    assert version.version == 1 and text == "You are a calculator. Answer {{question}}.\n"
    assert registry.read_prompt(name)[1] == "Think step by step, then answer. ✓\n"  # latest

    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    assert client.load_prompt(f"prompts:/{name}@production").version == 1
    registry.promote(name, 2, "production")
    assert client.get_prompt_version_by_alias(name, "production").version == 2
    assert registry.aliases(name) == {"production": 2, "latest": 2}


def test_promote_rollback_history_and_mlflow_alias(registry: MlflowRegistry, name: str, tmp_path: Path) -> None:
    for seed in range(3):
        registry.publish("checkpoint", name, tiny_checkpoint(tmp_path / f"ckpt{seed}", seed=seed))
    registry.promote(name, 1, "production")
    registry.promote(name, 3, "production", reason="better reward")
    registry.promote(name, 2, "candidate")
    back = registry.rollback(name, "production", reason="regression")
    assert back.rollback and (back.version, back.previous, back.sequence) == (1, 3, 3)

    assert registry.resolve(f"{name}@production").version == 1
    history = registry.alias_moves(name, "production")
    assert [(m.sequence, m.version, m.previous, m.rollback) for m in history] == [
        (1, 1, None, False), (2, 3, 1, False), (3, 1, 3, True)]
    assert history[1].reason == "better reward" and "@" in history[1].actor
    assert [m.alias for m in registry.alias_moves(name)] == ["production", "production", "candidate", "production"]

    client = MlflowClient(tracking_uri=registry.tracking_uri)
    assert client.get_model_version_by_alias(name, "production").version == "1"
    assert client.get_model_version_by_alias(name, "candidate").version == "2"


def test_taken_sequence_is_a_conflict(registry: MlflowRegistry, mlflow_server: MlflowServer, name: str,
                                      tmp_path: Path) -> None:
    registry.publish_prompt(name, "one")
    registry.publish_prompt(name, "two")
    move = registry.promote(name, 1, "production")
    with pytest.raises(AliasConflictError, match="expected 0"):
        registry.promote(name, 2, "production", expected_sequence=0)
    with pytest.raises(AliasConflictError, match="already made"):
        registry._append_alias_move(replace(move, version=2, previous=1))

    # Two writers (separate clients) claim sequence 2 at once: exactly one wins, the log stays linear.
    writers = [MlflowRegistry(mlflow_server.url, cache_dir=tmp_path / f"cache{i}") for i in range(2)]
    outcomes: list[str] = []

    def claim(writer: MlflowRegistry, version: int) -> None:
        try:
            writer._append_alias_move(replace(move, version=version, previous=1, sequence=2))
            outcomes.append("won")
        except AliasConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=claim, args=(writer, 2)) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict", "won"]
    assert [m.sequence for m in registry.alias_moves(name, "production")] == [1, 2]


def test_search_by_metadata_and_lineage(registry: MlflowRegistry, name: str) -> None:
    long_note = "x" * 20_000  # far past one tag value: stored in chunks
    registry.publish_prompt(name, "a", metadata={"stage": "dev"},
                            lineage=Lineage(pipeline_config_hash="abc", extra={"note": long_note}))
    registry.publish_prompt(name, "b", metadata={"stage": "prod"},
                            lineage=Lineage(pipeline_config_hash="def", metrics={"reward": 0.5}))
    assert [v.version for v in registry.search({"stage": "prod"}, name=name)] == [2]
    assert [v.version for v in registry.search({"pipeline_config_hash": "abc"}, name=name)] == [1]
    assert [v.version for v in registry.search({"metrics.reward": "0.5"}, kind="prompt")
            if v.name == name] == [2]
    assert registry.version(name, 1).lineage.extra["note"] == long_note


def test_unknown_names_versions_aliases_and_kind_mismatch(registry: MlflowRegistry, name: str,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError, match=name):
        registry.versions(name)
    registry.publish_prompt(name, "hello")
    with pytest.raises(ArtifactNotFoundError, match="no version 7"):
        registry.resolve(f"{name}@7")
    with pytest.raises(ArtifactNotFoundError, match="no alias 'production'"):
        registry.resolve(f"{name}@production")
    with pytest.raises(ArtifactNotFoundError, match="no earlier version"):
        registry.rollback(name, "production")
    with pytest.raises(InvalidArtifactError, match="holds prompts"):
        registry.publish("checkpoint", name, tiny_checkpoint(tmp_path / "ckpt"))


def test_open_registry_and_unreachable_server(mlflow_server: MlflowServer) -> None:
    assert isinstance(open_registry(f"mlflow+{mlflow_server.url}"), MlflowRegistry)
    started = time.monotonic()
    with pytest.raises(RegistryError, match=r"cannot reach the MLflow tracking server at http://127\.0\.0\.1:9"):
        MlflowRegistry("http://127.0.0.1:9")
    assert time.monotonic() - started < 5


def test_the_embedded_server_follows_an_alias_on_mlflow(registry: MlflowRegistry, name: str, tmp_path: Path) -> None:
    for seed in (1, 2):
        version = registry.publish("checkpoint", name, build_tiny_model(tmp_path / f"m{seed}", seed=seed)).version
    registry.promote(name, 1, "production")
    follower = AliasFollower(f"registry:{name}@production", registry=registry, interval_s=60, device="cpu")
    try:
        assert follower.serving.version == 1
        registry.promote(name, version.version, "production")
        assert follower.poll()
        assert follower.serving.version == 2
        assert follower.slot.current.model_version.startswith(f"{name}@2+")
    finally:
        follower.close()
