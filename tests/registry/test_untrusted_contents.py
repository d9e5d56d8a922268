"""The registry against a hostile user: aliases named like versions, files slipped into a version
directory, a manifest edited together with its file, and links that leave a checkpoint directory."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.checkpoints import write_hf_checkpoint

from tracelearn.registry import CorruptArtifactError, InvalidArtifactError, InvalidReferenceError
from tracelearn.registry.filesystem import FilesystemRegistry

TRACELEARN = str(Path(sys.executable).parent / "tracelearn")


def tracelearn(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRACELEARN, *arguments], capture_output=True, text=True, check=False, timeout=120)


@pytest.fixture
def registry(tmp_path: Path) -> FilesystemRegistry:
    return FilesystemRegistry(tmp_path / "registry")


# Aliases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["v3", "v0", "v12", "v1234567890"])
def test_an_alias_that_reads_as_a_version_is_refused(registry: FilesystemRegistry, alias: str) -> None:
    for text in ("one", "two", "three"):
        registry.publish_prompt("s", text)
    with pytest.raises(InvalidReferenceError, match=rf"invalid alias '{alias}': it reads as a version number"):
        registry.promote("s", 1, alias)
    assert registry.alias_moves("s") == []
    registry.promote("s", 1, "v3-candidate")  # a name that only starts like a version is fine
    assert registry.resolve("s@v3-candidate").version == 1
    assert registry.resolve("s@v3").version == 3


def test_publish_with_a_version_like_alias_publishes_nothing(registry: FilesystemRegistry, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello")
    completed = tracelearn("registry", "publish", "prompt", "s", str(tmp_path / "p.txt"), "--alias", "v2",
                           "--registry", registry.location)
    assert completed.returncode == 1, completed.stdout
    assert "invalid alias 'v2': it reads as a version number" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert registry.names() == []


# What is loaded ----------------------------------------------------------------------------------


@pytest.mark.parametrize("added", ["adapter_config.json", "extra/model-00002.safetensors", ".hidden"])
def test_a_file_added_to_a_version_directory_is_refused_on_load(
        registry: FilesystemRegistry, tmp_path: Path, added: str) -> None:
    version = registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "a")).version
    stored = registry.local_path(version)
    (stored / added).parent.mkdir(parents=True, exist_ok=True)
    (stored / added).write_text("{}")

    with pytest.raises(CorruptArtifactError, match=rf"m@1.*holds {added.split('/')[0]}.*not in the version's manifest"):
        FilesystemRegistry(registry.location).local_path(version)
    top = stored / added.split("/")[0]
    shutil.rmtree(top) if top.is_dir() else top.unlink()
    assert FilesystemRegistry(registry.location).local_path(version) == stored


def test_a_link_added_to_a_version_directory_is_refused_on_load(registry: FilesystemRegistry, tmp_path: Path) -> None:
    version = registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "a")).version
    stored = registry.local_path(version)
    (tmp_path / "elsewhere").mkdir()
    (stored / "more").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CorruptArtifactError, match=r"holds more/.*not in the version's manifest"):
        registry.local_path(version)


def test_a_manifest_rewritten_with_its_file_is_detected(registry: FilesystemRegistry, tmp_path: Path) -> None:
    version = registry.publish("checkpoint", "m", write_hf_checkpoint(tmp_path / "a", seed=1)).version
    stored = registry.local_path(version)
    replacement = write_hf_checkpoint(tmp_path / "b", seed=2) / "model.safetensors"
    (stored / "model.safetensors").write_bytes(replacement.read_bytes())
    record_path = Path(registry.location) / "m" / "versions" / "1" / "version.json"
    record = json.loads(record_path.read_text())
    for entry in record["files"]:
        if entry["path"] == "model.safetensors":  # the file's new checksum, the digest left as published
            entry["size"] = replacement.stat().st_size
            entry["sha256"] = hashlib.sha256(replacement.read_bytes()).hexdigest()
    record_path.write_text(json.dumps(record))

    reread = FilesystemRegistry(registry.location)
    with pytest.raises(CorruptArtifactError, match=r"m@1.*manifest hashes to .*the manifest was edited"):
        reread.local_path(reread.resolve("m@1"))


# Links in what is published ----------------------------------------------------------------------


def test_a_link_leaving_the_checkpoint_directory_is_refused_and_named(
        registry: FilesystemRegistry, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    checkpoint = write_hf_checkpoint(tmp_path / "ckpt")
    (checkpoint / "notes.txt").symlink_to(secret)

    with pytest.raises(InvalidArtifactError, match=r"ckpt/notes\.txt is a link to .*outside/passwd, outside"):
        registry.publish("checkpoint", "m", checkpoint)
    completed = tracelearn("registry", "publish", "checkpoint", "m", str(checkpoint), "--registry", registry.location)
    assert completed.returncode == 1
    assert "notes.txt is a link to" in completed.stderr and "--follow-links" in completed.stderr
    assert registry.names() == []

    completed = tracelearn("registry", "publish", "checkpoint", "m", str(checkpoint), "--follow-links",
                           "--registry", registry.location)
    assert completed.returncode == 0, completed.stderr
    stored = registry.local_path(registry.resolve("m@1")) / "notes.txt"
    assert not stored.is_symlink() and stored.read_text() == secret.read_text()


def test_a_linked_folder_leaving_the_directory_is_refused(registry: FilesystemRegistry, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text("key")
    checkpoint = write_hf_checkpoint(tmp_path / "ckpt")
    (checkpoint / "assets").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidArtifactError, match=r"ckpt/assets is a link to .*outside"):
        registry.publish("checkpoint", "m", checkpoint)
    version = registry.publish("checkpoint", "m", checkpoint, follow_links=True).version
    assert "assets/id_rsa" in {entry.path for entry in version.files}


def test_links_inside_the_directory_are_published_as_files(registry: FilesystemRegistry, tmp_path: Path) -> None:
    checkpoint = write_hf_checkpoint(tmp_path / "ckpt")
    (checkpoint / "blobs").mkdir()
    (checkpoint / "model.safetensors").replace(checkpoint / "blobs" / "abc123")
    (checkpoint / "model.safetensors").symlink_to("blobs/abc123")  # a relative link, as the HF cache writes
    (checkpoint / "same").symlink_to(checkpoint / "blobs")

    version = registry.publish("checkpoint", "m", checkpoint).version
    assert {entry.path for entry in version.files} >= {"model.safetensors", "blobs/abc123", "same/abc123"}
    stored = registry.local_path(version)
    assert not (stored / "model.safetensors").is_symlink()
    assert (stored / "model.safetensors").read_bytes() == (checkpoint / "blobs" / "abc123").read_bytes()


def test_dangling_links_and_link_cycles_are_refused(registry: FilesystemRegistry, tmp_path: Path) -> None:
    dangling = write_hf_checkpoint(tmp_path / "dangling")
    (dangling / "tokenizer_config.json").symlink_to(tmp_path / "missing.json")
    with pytest.raises(InvalidArtifactError, match=r"tokenizer_config\.json is a link to .*missing\.json, which"):
        registry.publish("checkpoint", "m", dangling)

    cycle = write_hf_checkpoint(tmp_path / "cycle")
    (cycle / "sub").mkdir()
    (cycle / "sub" / "loop").symlink_to(cycle)
    with pytest.raises(InvalidArtifactError, match=r"sub/loop links back to"):
        registry.publish("checkpoint", "m", cycle)
