"""``tracelearn feedback add`` and ``tracelearn feedback import``."""

import json
from pathlib import Path

from click.testing import CliRunner

from tracelearn.cli.main import main
from tracelearn.schemas.dataset import read_table


def test_add_writes_one_row(tmp_path: Path) -> None:
    args = ["feedback", "add", str(tmp_path), "--rollout-id", "r1", "--name", "thumbs", "--value", "1", "--source", "u"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    table = read_table(tmp_path / "feedback", "feedback")
    assert table.select(["rollout_id", "name", "value", "source"]).to_pylist() == [
        {"rollout_id": "r1", "name": "thumbs", "value": 1.0, "source": "u"}
    ]


def test_add_without_a_target_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["feedback", "add", str(tmp_path), "--name", "thumbs", "--value", "1"])
    assert result.exit_code != 0 and "needs rollout_id or trace_id" in result.output


def test_import_a_bad_line_names_it_and_writes_nothing(tmp_path: Path) -> None:
    lines = tmp_path / "feedback.jsonl"
    good = {"rollout_id": "r1", "name": "thumbs", "value": 1.0}
    lines.write_text(f"{json.dumps(good)}\n{json.dumps({**good, 'value': 'high'})}\n", encoding="utf-8")
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["feedback", "import", str(data), str(lines)])
    assert result.exit_code != 0
    assert f"{lines}:2: value: 'high' must be a finite number" in result.output
    assert not (data / "feedback").exists()
    lines.write_text(f"{json.dumps(good)}\n\n{json.dumps({**good, 'rollout_id': 'r2'})}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["feedback", "import", str(data), str(lines)])
    assert result.exit_code == 0, result.output
    assert sorted(read_table(data / "feedback", "feedback").column("rollout_id").to_pylist()) == ["r1", "r2"]
