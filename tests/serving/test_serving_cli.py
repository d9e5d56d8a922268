"""``tracelearn serve`` as a user runs it: a real process that prints its URL, answers, and stops on SIGTERM."""

import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner
from openai import OpenAI

from tracelearn.cli.serve import serve
from tracelearn.models import FETCH_COMMAND
from tracelearn.registry import open_registry
from tracelearn.serving.http_server import free_port


def test_missing_default_model_fails_with_the_setup_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(serve, ["--model", "smollm2"], env={"TRACELEARN_MODEL_CACHE": str(tmp_path)})
    assert result.exit_code == 1
    assert FETCH_COMMAND in result.output


@pytest.mark.timeout(120)  # were --registry ignored, the model would load from the environment's registry and serve
def test_a_registry_model_is_looked_up_in_the_registry_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    registry = open_registry(tmp_path / "with-model")
    registry.publish("checkpoint", "tiny", tiny_model_dir)
    registry.promote("tiny", 1, "production")
    result = CliRunner().invoke(serve, ["--model", "registry:tiny@production", "--registry", str(tmp_path / "empty")],
                                env={"TRACELEARN_REGISTRY": str(tmp_path / "with-model")})
    assert result.exit_code == 1
    assert "tiny" in result.output and str(tmp_path / "empty") in result.output


def test_the_vllm_engine_without_vllm_installed_says_how_to_get_it(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(serve, ["--engine", "vllm", "--model", str(tiny_model_dir)])
    assert result.exit_code == 1
    assert "vllm is not installed here and TRACELEARN_VLLM_PYTHON is not set" in result.output
    assert "pip install vllm==" in result.output  # the pinned release, in an environment of its own


def test_serve_prints_its_url_answers_and_stops_cleanly_on_sigterm(tiny_model_dir: Path) -> None:
    port = free_port()
    tracelearn = Path(sys.executable).parent / "tracelearn"
    process = subprocess.Popen(
        [str(tracelearn), "serve", "--model", str(tiny_model_dir), "--port", str(port), "--served-model-name", "tiny",
         "--max-body-mb", "0.01", "--default-max-tokens", "3", "--prefix-cache-mb", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert process.stdout is not None
    try:
        lines = []
        while not any(line.startswith("serving ") for line in lines):
            line = process.stdout.readline()
            if not line:
                pytest.fail("the server exited before serving:\n" + "".join(lines))
            lines.append(line)
        assert f"serving tiny on http://127.0.0.1:{port}/v1" in lines[-1]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].finish_reason in {"stop", "length"}
        defaulted = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert defaulted.usage is not None and defaulted.usage.completion_tokens <= 3  # --default-max-tokens
        with pytest.raises(openai.APIStatusError) as too_large:  # --max-body-mb: 10 KiB
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 20_000}])
        assert too_large.value.status_code == 413
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "shutting down" in output
