"""``tracelearn.prompt``: agents read a prompt by alias and pick up promotions without a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tracelearn
from tracelearn.registry import ArtifactNotFoundError, InvalidReferenceError
from tracelearn.registry.filesystem import FilesystemRegistry
from tracelearn.registry.prompts import PROMPTS_ENV, pinned_references


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FilesystemRegistry:
    location = tmp_path / "registry"
    monkeypatch.setenv("TRACELEARN_REGISTRY", str(location))
    monkeypatch.delenv(PROMPTS_ENV, raising=False)
    registry = FilesystemRegistry(location)
    registry.publish_prompt("calc-system", "You are a calculator. Answer {question}.")
    registry.publish_prompt("calc-system", "You are a careful calculator. Show your work for {question}.")
    registry.promote("calc-system", 1, "production")
    return registry


def test_prompt_reads_production_by_default_and_follows_a_promotion(registry: FilesystemRegistry) -> None:
    assert tracelearn.prompt("calc-system", refresh_seconds=0) == "You are a calculator. Answer {question}."
    registry.promote("calc-system", 2, "production")
    assert tracelearn.prompt("calc-system", refresh_seconds=0).startswith("You are a careful calculator")
    assert tracelearn.prompt("calc-system", alias="latest", refresh_seconds=0).startswith("You are a careful")


def test_within_the_refresh_interval_the_cached_text_is_served(registry: FilesystemRegistry) -> None:
    first = tracelearn.prompt("calc-system", refresh_seconds=3600)
    registry.promote("calc-system", 2, "production")
    assert tracelearn.prompt("calc-system", refresh_seconds=3600) == first


def test_a_vanished_registry_serves_the_cached_text(registry: FilesystemRegistry,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    text = tracelearn.prompt("calc-system", alias="production", refresh_seconds=0)
    shutil.rmtree(registry.location)
    assert tracelearn.prompt("calc-system", alias="production", refresh_seconds=0) == text
    assert "cannot refresh prompt calc-system@production" in caplog.text


def test_pins_choose_a_version_for_one_run(registry: FilesystemRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROMPTS_ENV, "calc-system=calc-system@2, other=other@candidate")
    assert tracelearn.prompt("calc-system", refresh_seconds=0).startswith("You are a careful calculator")
    assert pinned_references() == {"calc-system": "calc-system@2", "other": "other@candidate"}
    with pytest.raises(InvalidReferenceError, match="NAME=REFERENCE"):
        pinned_references("calc-system")


def test_a_prompt_never_loaded_raises_a_clear_error(registry: FilesystemRegistry) -> None:
    with pytest.raises(ArtifactNotFoundError, match="no alias 'candidate'"):
        tracelearn.prompt("calc-system", alias="candidate")
