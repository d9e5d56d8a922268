"""``tracelearn demo`` runs the calc example of a clone; installed without one, it says so instead of
guessing a path, and ``--example-dir`` names another copy (checked before anything starts)."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from tracelearn.cli import demo as demo_command
from tracelearn.cli.main import main
from tracelearn.training.loop_demo import QUICK, demo_spec

CALC = Path(__file__).resolve().parents[2] / "examples" / "calc"


def test_outside_a_clone_the_demo_says_where_the_example_is_missing(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_command, "CLONE_EXAMPLE", tmp_path / "site-packages" / "examples" / "calc")
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "runs the calc example of a clone of the repository" in result.output
    assert "pass --example-dir DIR" in result.output
    assert not (tmp_path / "run").exists(), "nothing was started"


def test_an_example_dir_without_the_example_s_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "loop.yaml").write_text("name: x\n")
    result = CliRunner().invoke(main, ["demo", "--quick", "--workdir", str(tmp_path / "run"),
                                       "--example-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 1
    assert "is not the calc example's directory: it has no train.yaml, pipeline.yaml, agent.py" in result.output


def test_the_demo_spec_is_the_example_at_demo_size_with_absolute_paths(tmp_path: Path) -> None:
    spec, written = demo_spec(QUICK, "smollm2", tmp_path, CALC)
    assert written == tmp_path / "loop.yaml" and spec.model == "smollm2"
    assert (spec.collect.limit, spec.collect.samples) == (QUICK.train_tasks, QUICK.train_samples)
    assert (spec.evaluate.limit, spec.evaluate.samples) == (QUICK.eval_tasks, QUICK.eval_samples)
    assert spec.pipeline == CALC / "pipeline.yaml" and spec.collect.tasks.parent == CALC
    assert str(CALC / "agent.py") in spec.agent
