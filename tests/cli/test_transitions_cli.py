"""``tracelearn transitions build``: summary table, files written, bad configs refused before any data."""

import re
import sys
from pathlib import Path

import polars as pl
from click.testing import CliRunner, Result
from support.spans_factory import SpansFactory

from tracelearn.cli.main import main


def write_spans(data: Path) -> None:
    """Two tasks x two rollouts, two calls each (planner, writer), one reward per rollout."""
    factory = SpansFactory(data / "spans")
    for trace, (task, value) in enumerate([("t1", 1.0), ("t1", 0.0), ("t2", 1.0), ("t2", 1.0)], start=1):
        root = factory.root(trace, 0, 100, task_id=task)
        factory.llm(trace, root, 1, user=f"{task}: plan", task_id=task, agent="planner")
        factory.llm(trace, root, 3, user=f"{task}: write", task_id=task, agent="writer")
        factory.reward(trace, root, 99, value, task_id=task)
    factory.write()


def build_with_config(tmp_path: Path, config_text: str) -> tuple[Result, Path]:
    """Run ``tracelearn transitions build`` on fresh spans with ``config_text`` as pipeline.yaml."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_spans(data)
    config = tmp_path / "pipeline.yaml"
    config.write_text(config_text, encoding="utf-8")
    result = CliRunner().invoke(
        main, ["transitions", "build", "--spans", str(data), "--out", str(out), "--config", str(config)]
    )
    return result, out


def test_build_prints_a_summary_and_writes_the_datasets(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    write_spans(data)
    config = tmp_path / "pipeline.yaml"
    config.write_text('select: {agent: "writer"}\n', encoding="utf-8")
    args = ["transitions", "build", "--spans", str(data / "spans"), "--out", str(out), "--config", str(config)]
    result = CliRunner().invoke(main, [*args, "--lateness-seconds", "0", "--date", "2026-11-21", "--bucket-mb", "1"])
    assert result.exit_code == 0, result.output
    assert "transitions build" in result.output and "zero-signal groups" in result.output
    assert "config hash" in result.output
    assert summary_value(result.output, "rollouts built") == 4
    assert summary_value(result.output, "buckets built") == 1
    for label in ("rollouts rewarded by the function", "function raised", "rollouts with a feedback reward"):
        assert summary_value(result.output, label) == 0
    assert summary_value(result.output, "rollouts rebuilt with late spans") == 0
    files = sorted((out / "transitions").rglob("*.parquet"))
    assert len(files) == 1 and files[0].parent.name == "date=2026-11-21"
    transitions = pl.read_parquet(files[0])
    assert transitions.height == 4 and set(transitions["agent_name"]) == {"writer"}
    assert sorted((out / "rollouts").rglob("*.parquet"))


def summary_value(output: str, label: str) -> int:
    """The number on the build summary row ``label``."""
    found = re.search(rf"{re.escape(label)}\s*│\s*(\d+)\s*│", output)
    assert found, f"no row {label!r} in:\n{output}"
    return int(found.group(1))


def test_summary_counts_function_rewards_failures_feedback_and_late_spans(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    write_spans(data)
    (tmp_path / "reward_fns.py").write_text(
        "def by_task(task_id):\n"
        "    if task_id == 't2':\n"
        "        raise RuntimeError('no grader for t2')\n"
        "    return 0.5\n",
        encoding="utf-8",
    )
    feedback = ["feedback", "add", str(data), "--name", "thumbs", "--value", "1"]
    rollout_id = pl.read_parquet(data / "spans" / "**" / "*.parquet")["rollout_id"].drop_nulls()[0]
    assert CliRunner().invoke(main, [*feedback, "--rollout-id", rollout_id]).exit_code == 0
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "reward: {function: reward_fns:by_task, name: graded, feedback: true, primary: graded, missing: keep}\n",
        encoding="utf-8",
    )
    args = ["transitions", "build", "--spans", str(data), "--out", str(out), "--config", str(config)]
    sys.path.insert(0, str(tmp_path))
    try:
        result = CliRunner().invoke(main, [*args, "--lateness-seconds", "0"])
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code == 0, result.output
    assert summary_value(result.output, "rollouts rewarded by the function") == 2
    assert summary_value(result.output, "function raised") == 2
    assert summary_value(result.output, "function input missing") == 0
    assert summary_value(result.output, "rollouts with a feedback reward") == 1


def test_bucket_mb_must_be_positive(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["transitions", "build", "--spans", str(tmp_path), "--out", str(tmp_path / "out"), "--bucket-mb", "0"]
    )
    assert result.exit_code == 2 and "--bucket-mb" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_config_is_refused_before_any_output(tmp_path: Path) -> None:
    result, out = build_with_config(tmp_path, "credit: {method: no-such-method}\n")
    assert result.exit_code != 0
    assert "credit.method" in result.output and "no-such-method" in result.output
    assert not out.exists()


def test_old_reward_source_key_is_refused_before_any_output(tmp_path: Path) -> None:
    result, out = build_with_config(tmp_path, "reward: {source: feedback}\n")
    assert result.exit_code != 0 and "replaced by one key per source" in result.output
    assert not out.exists()


def test_a_first_build_without_a_reward_yields_transitions_and_says_how_to_add_one(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    factory = SpansFactory(data / "spans")
    root = factory.root(1, 0, 10)
    factory.llm(1, root, 1, user="What is 2 plus 2?")
    factory.write()
    spool = data / "spans" / "_spool"
    spool.mkdir()
    (spool / "spool-20261121T120000-host-1-w-000001.arrows").write_bytes(b"\0" * 2048)
    # The collector sidecar's write-ahead request log counts too.
    (spool / "requests-20261121T120000-host-2-w-000001.otlp").write_bytes(b"\0" * 2048)
    result = CliRunner().invoke(main, ["transitions", "build", "--spans", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert summary_value(result.output, "transitions") == 1 and summary_value(result.output, "rollouts built") == 1
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert "reward.function" in notes[0] and "pipeline.yaml" in notes[0], result.output
    assert "2 spool segment(s)" in result.output and "tracelearn spans replay" in result.output


def test_stats_on_a_build_without_transitions_says_so_plainly(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    factory = SpansFactory(data / "spans")
    root = factory.root(1, 0, 10)
    factory.tool(1, root, 1)  # an agent whose LLM calls no instrumentation saw
    factory.write()
    built = CliRunner().invoke(main, ["transitions", "build", "--spans", str(data), "--out", str(out)])
    assert built.exit_code == 0 and summary_value(built.output, "transitions") == 0, built.output
    result = CliRunner().invoke(main, ["transitions", "stats", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the build made 1 rollouts (0 LLM calls in them) and no transitions" in " ".join(result.output.split())
    assert "expected 'transitions'" not in result.output
