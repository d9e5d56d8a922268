"""``tracelearn transitions export``: counts printed, train/val files written, clean errors."""

from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner
from support.spans_factory import SpansFactory, at

from tracelearn.cli.main import main
from tracelearn.pipelines.build import build_transitions


def build(tmp_path: Path) -> Path:
    """Two tasks x two rollouts (rewards 1 and 0), one call each, built into ``tmp_path/out``."""
    factory = SpansFactory(tmp_path / "data" / "spans")
    for trace, (task, value) in enumerate([("t1", 1.0), ("t1", 0.0), ("t2", 1.0), ("t2", 0.0)], start=1):
        root = factory.root(trace, 0, 100, task_id=task)
        factory.llm(trace, root, 1, user=f"{task}: plan", task_id=task, agent="planner")
        factory.reward(trace, root, 99, value, task_id=task)
    factory.write()
    build_transitions(tmp_path / "data", tmp_path / "out", now=at(3600))
    return tmp_path / "out"


def export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["transitions", "export", *args])
    return result.exit_code, result.output


def test_sft_export_prints_counts_and_writes_train_and_val(tmp_path: Path) -> None:
    out = build(tmp_path)
    code, output = export(str(out), "--format", "verl-sft", "--out", str(tmp_path / "sft"), "--min-reward", "1")
    assert code == 0, output
    assert "skipped below_min_reward: 2" in output and "skipped bad_messages: 0" in output
    assert "written train:" in output and "written val:" in output
    rows = sum(pq.read_table(tmp_path / "sft" / name).num_rows for name in ("train.parquet", "val.parquet"))
    assert rows == 2


def test_rl_and_replay_exports_report_what_they_skipped(tmp_path: Path) -> None:
    out = build(tmp_path)
    code, output = export(str(out / "transitions"), "--format", "verl-rl", "--out", str(tmp_path / "rl"))
    assert code == 0, output
    assert "skipped duplicate_prompt: 2" in output
    code, output = export(str(out), "--format", "verl-replay", "--out", str(tmp_path / "replay"))
    assert code == 0, output
    assert "skipped without_token_ids: 4" in output  # the factory's calls carry no token ids


def test_errors_are_clean_messages(tmp_path: Path) -> None:
    code, output = export(str(tmp_path / "nowhere"), "--format", "verl-rl", "--out", str(tmp_path / "x"))
    assert code != 0 and "Error:" in output and "no such file or directory" in output
    assert "Traceback" not in output
    out = build(tmp_path)
    code, output = export(str(out), "--format", "verl-rl", "--out", str(tmp_path / "x"), "--config-hash", "zzz")
    assert code != 0 and "must match exactly one" in output
    code, output = export(str(out), "--format", "verl-rl", "--out", str(tmp_path / "x"), "--min-reward", "1")
    assert code != 0 and "--min-reward applies to --format verl-sft only" in output
    code, output = export(str(out), "--format", "parquet", "--out", str(tmp_path / "x"))
    assert code != 0 and "verl-rl" in output
