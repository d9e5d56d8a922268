"""Fixtures shared by the whole test suite (support code lives in ``tests/support/``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.scripted_llm_server import ScriptedLLMServer

if TYPE_CHECKING:
    from tracelearn.models import LoadedModel


@pytest.fixture
def scripted_llm_server() -> Iterator[ScriptedLLMServer]:
    """A real OpenAI-compatible server on a free loopback port with scripted, vLLM-shaped answers."""
    with ScriptedLLMServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random chat model directory (``support.tiny_model``), built once per session."""
    from support.tiny_model import build_tiny_model  # torch and transformers only for the tests that use it

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat-model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    """That model, loaded on the CPU."""
    from tracelearn.models import load_model, resolve_model

    return load_model(resolve_model(str(tiny_model_dir)), device="cpu")
