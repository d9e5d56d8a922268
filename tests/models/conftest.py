"""Fixtures of the model tests: one tiny random model directory (built once per session), loaded."""

from pathlib import Path

import pytest
from support.tiny_model import build_tiny_model

from tracelearn.models import LoadedModel, load_model, resolve_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat-model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(resolve_model(str(tiny_model_dir)), device="cpu")
