"""Fixtures of the serving tests: an engine on the suite's tiny random model (tests/conftest.py)."""

from collections.abc import Iterator

import pytest

from tracelearn.models import LoadedModel
from tracelearn.serving.engine import GenerationEngine


@pytest.fixture(scope="session")
def engine(tiny_model: LoadedModel) -> Iterator[GenerationEngine]:
    # A 20 ms window so a burst of requests from test threads reliably starts as one batch.
    engine = GenerationEngine(tiny_model, max_batch_size=8, batch_window_s=0.02)
    yield engine
    engine.close()
