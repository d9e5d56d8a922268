"""The distro asks the official GenAI instrumentations to put message content on spans."""

import os

import pytest

from tracelearn.instrumentation import distro

SET_BY_DISTRO = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    distro.GENAI_CAPTURE_CONTENT,
    distro.SEMCONV_STABILITY_OPT_IN,
)


def test_content_goes_to_spans_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SET_BY_DISTRO:  # restored after the test, whatever the distro sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    distro.TracelearnDistro()._configure()
    assert os.environ[distro.GENAI_CAPTURE_CONTENT] == "SPAN_ONLY"
    assert os.environ[distro.SEMCONV_STABILITY_OPT_IN] == "gen_ai_latest_experimental"

    monkeypatch.setenv(distro.GENAI_CAPTURE_CONTENT, "NO_CONTENT")  # a user who wants no content keeps it so
    distro.TracelearnDistro()._configure()
    assert os.environ[distro.GENAI_CAPTURE_CONTENT] == "NO_CONTENT"


def test_the_stability_opt_in_keeps_the_users_modes() -> None:
    assert distro.with_genai_opt_in("") == "gen_ai_latest_experimental"
    assert distro.with_genai_opt_in("http, database") == "http,database,gen_ai_latest_experimental"
    assert distro.with_genai_opt_in("http,gen_ai_latest_experimental") == "http,gen_ai_latest_experimental"
