"""``tracelearn train grpo|sft`` from the command line: a run directory, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.tiny_model import build_tiny_model
from support.transitions_factory import Sample, write_transitions
from transformers import AutoTokenizer

from tracelearn.cli.main import main
from tracelearn.registry import open_registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def data(tiny: Path, tmp_path: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    samples = []
    for task in range(2):
        question = f"What is {task} plus 1?"
        samples += [Sample(question, str(task + 1), 1.0, 1.0, f"t{task}"),
                    Sample(question, "no", -1.0, 0.0, f"t{task}")]
    write_transitions(tmp_path / "data", tokenizer, samples)
    return tmp_path / "data"


@pytest.mark.parametrize("trainer", ["grpo", "sft"])
def test_train_writes_a_run_directory(tiny: Path, data: Path, tmp_path: Path, trainer: str) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", trainer, "--transitions", str(data), "--model", str(tiny),
                                       "--out", str(out), "--lora", "r=4,alpha=8", "--epochs", "2",
                                       "--precision", "fp32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "sequences trained on" in result.output and "tracelearn registry publish checkpoint" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainer"] == trainer and summary["lora"] is True
    assert summary["sequences"]["kept"] == (4 if trainer == "grpo" else 2)
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["lora"]["r"] == 4 and config["train_config"][trainer]["epochs"] == 2
    assert (out / "checkpoint" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--lora", "r=x"], "--lora: r: 'x' must be a whole number"),
        (["--epochs", "0"], "x>=1"),
        (["--config", "missing.yaml"], "cannot be read"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny: Path, data: Path, tmp_path: Path, arguments: list[str],
                                       message: str) -> None:
    result = CliRunner().invoke(main, ["train", "grpo", "--transitions", str(data), "--model", str(tiny),
                                       "--out", str(tmp_path / "run"), *arguments])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_missing_data_model_and_verl_are_one_line_errors(tiny: Path, data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["train", "sft", "--transitions", str(tmp_path / "nothing"), "--model", str(tiny),
                                   "--out", str(tmp_path / "a")])
    assert missing.exit_code == 1 and "no such file or directory" in missing.output
    unknown = runner.invoke(main, ["train", "grpo", "--transitions", str(data), "--model", "no-such-model",
                                   "--out", str(tmp_path / "b")])
    assert unknown.exit_code == 1 and "no model named 'no-such-model'" in unknown.output
    monkeypatch.delenv("TRACELEARN_VERL_PYTHON", raising=False)
    verl = runner.invoke(main, ["train", "grpo", "--backend", "verl", "--transitions", str(data), "--model", str(tiny),
                                "--out", str(tmp_path / "c")])
    assert verl.exit_code == 1 and "TRACELEARN_VERL_PYTHON" in verl.output
    small_batches = tmp_path / "train.yaml"
    small_batches.write_text("grpo: {mini_batch_size: 2}\n")
    prepared = runner.invoke(main, ["train", "grpo", "--backend", "verl", "--prepare-only", "--transitions", str(data),
                                    "--model", str(tiny), "--out", str(tmp_path / "d"), "--precision", "bf16",
                                    "--device", "cuda", "--config", str(small_batches)])
    assert prepared.exit_code == 0, prepared.output
    assert (tmp_path / "d" / "verl" / "launch.sh").exists() and "prepared only" in prepared.output


def test_sft_loads_a_registry_model_from_the_registry_flag(tiny: Path, data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--registry reaches the model load itself: the environment names another (empty) registry and stays as it was."""
    registry = open_registry(tmp_path / "registry")
    published = registry.publish("checkpoint", "tiny-policy", tiny).version
    registry.promote("tiny-policy", published.version, "production")
    monkeypatch.setenv("TRACELEARN_REGISTRY", str(tmp_path / "elsewhere"))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "sft", "--transitions", str(data), "--model",
                                       "registry:tiny-policy@production", "--registry", str(tmp_path / "registry"),
                                       "--out", str(out), "--epochs", "1", "--precision", "fp32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "lineage.json").read_text())["parent"] == "tiny-policy@1"
    assert os.environ["TRACELEARN_REGISTRY"] == str(tmp_path / "elsewhere")


def test_the_command_line_starts_without_torch() -> None:
    """Every subcommand but training and serving stays light: torch loads only when a trainer runs."""
    probe = "import sys, tracelearn.cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert completed.stdout.strip() == "[]"
