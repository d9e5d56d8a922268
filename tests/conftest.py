"""Fixtures shared by the whole test suite (support code lives in ``tests/support/``)."""

from collections.abc import Iterator

import pytest
from support.scripted_llm_server import ScriptedLLMServer


@pytest.fixture
def scripted_llm_server() -> Iterator[ScriptedLLMServer]:
    """A real OpenAI-compatible server on a free loopback port with scripted, vLLM-shaped answers."""
    with ScriptedLLMServer() as server:
        yield server
