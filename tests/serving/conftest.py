"""Fixtures of the serving tests: one tiny random model (built once per session) and its engine."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.tiny_model import build_tiny_model

from tracelearn.models import LoadedModel, load_model, resolve_model
from tracelearn.serving.engine import GenerationEngine


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat-model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(resolve_model(str(tiny_model_dir)), device="cpu")


@pytest.fixture(scope="session")
def engine(tiny_model: LoadedModel) -> Iterator[GenerationEngine]:
    # A 20 ms window so a burst of requests from test threads reliably starts as one batch.
    engine = GenerationEngine(tiny_model, max_batch_size=8, batch_window_s=0.02)
    yield engine
    engine.close()
