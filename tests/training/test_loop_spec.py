"""loop.yaml: the bundled one loads; every bad value is refused naming the file and the key; the report
reads a workdir's rounds back into rows, a table and a plot; a workdir refuses other settings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tracelearn.training.loop import LoopError, RoundState, prepare_loop
from tracelearn.training.loop_report import loop_rows, loop_table, plot_loop
from tracelearn.training.loop_spec import LoopSpecError, load_loop_spec

CALC = Path(__file__).resolve().parents[2] / "examples" / "calc"


def test_the_bundled_loop_config_loads_with_absolute_paths() -> None:
    spec = load_loop_spec(CALC / "loop.yaml")

    assert spec.collect.tasks == CALC / "products.jsonl" and spec.evaluate.tasks == CALC / "products_heldout.jsonl"
    assert spec.agent[:2] == ("python", str(CALC / "agent.py")) and "{concurrency}" in spec.agent
    assert spec.trainer == "grpo" and spec.pipeline == CALC / "pipeline.yaml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainer": "ppo"}, r"trainer: 'ppo' is unknown; use one of grpo, sft"),
        ({"collect": {"tasks": "nowhere.jsonl"}}, r"collect\.tasks: .*nowhere\.jsonl is not a file"),
        ({"collect": {"tasks": "products.jsonl", "samples": 0}}, r"collect\.samples: 0 must be a whole number of at "
                                                                 r"least 1"),
        ({"evaluate": {"tasks": "products.jsonl", "sample": 2}}, r"evaluate\.sample: unknown key"),
        ({"margin": 1.5}, r"margin: 1\.5 must be a fraction in \[0, 1\)"),
        ({"capture": "carrier-pigeon"}, r"capture: 'carrier-pigeon' is unknown"),
        ({"agent": []}, r"agent: \[\] must be a command"),
        ({"rounds": 3}, r"rounds: unknown key"),
    ],
)
def test_a_bad_loop_config_names_the_file_and_the_key(tmp_path: Path, change: dict[str, object], message: str) -> None:
    raw = yaml.safe_load((CALC / "loop.yaml").read_text())
    raw.update(change)
    for name in ("products.jsonl", "products_heldout.jsonl", "pipeline.yaml", "train.yaml", "agent.py"):
        (tmp_path / name).symlink_to(CALC / name)
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(raw))

    with pytest.raises(LoopSpecError, match=rf"^{path}: {message}"):
        load_loop_spec(path)


def test_a_workdir_refuses_a_loop_with_other_settings(tmp_path: Path) -> None:
    spec = load_loop_spec(CALC / "loop.yaml")
    workdir = tmp_path / "loop"
    (workdir / "registry").mkdir(parents=True)
    (workdir / "loop.json").write_text(json.dumps({"digest": "0" * 64, "spec": {**spec.to_dict(), "trainer": "sft"}}))

    with pytest.raises(LoopError, match=r"holds a loop run with other settings \(changed: trainer\)"):
        prepare_loop(spec, workdir, Console(file=io.StringIO()))


def behaviour(success: float, tools: float, turns: float) -> dict[str, object]:
    return {"n": 10, "success_rate": success, "success_interval_95": [max(0, success - 0.2), min(1, success + 0.2)],
            "tool_call_rate": tools, "tool_call_interval_95": [max(0, tools - 0.2), min(1, tools + 0.2)],
            "mean_llm_calls": turns}


def test_the_report_reads_every_round_back(tmp_path: Path) -> None:
    for ref, numbers in {"calc-policy@1": (0.1, 0.2, 1.2), "calc-policy@2": (0.5, 0.6, 1.6),
                         "calc-policy@3": (0.4, 0.5, 1.5)}.items():
        folder = tmp_path / "evals" / ref
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"result": {}, "behaviour": behaviour(*numbers)}))
    collected = {"success_rate": 0.25, "tool_call_rate": 0.3, "groups": 8, "zero_signal_groups": 3}
    steps = {"collect": {"production": "calc-policy@1"}, "build": collected}
    RoundState(1, tmp_path / "rounds" / "01", {**steps, "publish": {"candidate": "calc-policy@2"}},
               "promoted", "better").save()
    RoundState(2, tmp_path / "rounds" / "02", {**steps, "publish": {"candidate": "calc-policy@3"}},
               "not_promoted", "worse").save()
    RoundState(3, tmp_path / "rounds" / "03", steps, "no_signal", "no learning signal").save()
    RoundState(4, tmp_path / "rounds" / "04", {"collect": steps["collect"]}).save()

    rows = loop_rows(tmp_path)

    assert [(r.number, r.outcome, r.production) for r in rows] == [
        (0, "start", "calc-policy@1"), (1, "promoted", "calc-policy@2"), (2, "not_promoted", "calc-policy@2"),
        (3, "no_signal", "calc-policy@2"), (4, "running: build", "calc-policy@2")]
    assert rows[2].candidate_eval is not None and rows[2].candidate_eval["success_rate"] == 0.4
    text = io.StringIO()
    Console(file=text, width=250).print(loop_table(rows))
    assert "50.0% [30, 70]" in text.getvalue() and "25% / 30% / 5 of 8" in text.getvalue()
    assert plot_loop(rows, tmp_path / "loop.png").stat().st_size > 0
