"""``tracelearn registry``: the commands a user types, end to end on a real registry directory."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result
from support.checkpoints import write_hf_checkpoint

from tracelearn.cli.main import main


def run(registry: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["registry", *args, "--registry", str(registry)])


def test_publish_promote_show_diff_rollback_and_history(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    (tmp_path / "v1.txt").write_text("You are a calculator.\n")
    (tmp_path / "v2.txt").write_text("You are a careful calculator.\nShow your work.\n")
    lineage = tmp_path / "lineage.json"
    lineage.write_text(json.dumps({"training_run_id": "run-42", "metrics": {"success": 0.5}}))

    published = run(registry, "publish", "prompt", "calc-system", str(tmp_path / "v1.txt"), "--alias", "production")
    assert published.exit_code == 0, published.output
    assert "published calc-system@1" in published.output and "calc-system@production -> 1" in published.output
    assert run(registry, "publish", "prompt", "calc-system", str(tmp_path / "v2.txt"),
               "--lineage", str(lineage), "--metadata", "owner=team-a").exit_code == 0
    again = run(registry, "publish", "prompt", "calc-system", str(tmp_path / "v2.txt"))
    assert "identical content already published as calc-system@2" in again.output

    promoted = run(registry, "promote", "calc-system", "2", "--alias", "production", "--reason", "better")
    assert "calc-system@production -> 2 (was 1)" in promoted.output
    shown = run(registry, "show", "calc-system@production")
    assert "calc-system@2" in shown.output and "training_run_id: run-42" in shown.output
    assert "metadata.owner: team-a" in shown.output and "Show your work." in shown.output
    assert json.loads(run(registry, "show", "calc-system@1", "--json").output)["aliases"] == []

    diff = run(registry, "diff", "calc-system", "1", "2").output
    assert "-You are a calculator." in diff and "+Show your work." in diff and '"run-42"' in diff

    listed = run(registry, "list").output
    assert "calc-system" in listed and "latest=2" in listed and "production=2" in listed
    assert "calc-system@2" in run(registry, "search", "training_run_id=run-42").output

    rolled = run(registry, "rollback", "calc-system", "--alias", "production")
    assert "rolled back to 1 (was 2)" in rolled.output
    history = run(registry, "history", "calc-system").output.splitlines()
    assert [line.split()[2] for line in history] == ["promote", "promote", "rollback"]
    assert "better" in history[1]


def test_checkpoint_diff_names_changed_files(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    run(registry, "publish", "checkpoint", "m", str(write_hf_checkpoint(tmp_path / "a", seed=1)))
    run(registry, "publish", "checkpoint", "m", str(write_hf_checkpoint(tmp_path / "b", seed=2)))
    diff = run(registry, "diff", "m", "1", "2").output
    assert "~ model.safetensors" in diff and "~ config.json" not in diff


def test_errors_are_one_line_messages(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    (tmp_path / "p.txt").write_text("hello")
    run(registry, "publish", "prompt", "s", str(tmp_path / "p.txt"))
    for args, message in [
        (["show", "s@production"], "has no alias 'production'"),
        (["promote", "s", "7", "--alias", "production"], "s has no version 7"),
        (["publish", "checkpoint", "m", str(tmp_path)], "is not a checkpoint"),
        (["show", "nope"], "no artifact named 'nope'"),
        (["rollback", "s", "--alias", "production"], "no earlier version"),
    ]:
        result = run(registry, *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    bad_lineage = tmp_path / "bad.json"
    bad_lineage.write_text(json.dumps({"metrics": {"success": "high"}}))
    result = run(registry, "publish", "prompt", "s", str(tmp_path / "p.txt"), "--lineage", str(bad_lineage))
    assert result.exit_code == 1 and "metric 'success' must be a finite number" in result.output
