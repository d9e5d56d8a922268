"""The reward engine over real spans Parquet: function rewards, feedback, several sources, the primary."""

import dataclasses
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.collector.feedback import append_feedback, feedback_item
from tracelearn.pipelines.config import (
    PipelineConfigError,
    config_hash,
    load_config,
    parse_config,
    reward_sources,
    rollout_config,
)
from tracelearn.pipelines.rewards import RewardFunctionError, function_reward_rows, load_reward_function
from tracelearn.pipelines.rollouts import RolloutBuild, build_closed_rollouts, build_rollouts
from tracelearn.pipelines.spans_input import scan_spans

LATER = at(3600)


def trace_hex(trace: int) -> str:
    return format(trace, "032x")


def task_run(factory: SpansFactory, trace: int, gold: str | None, emitted: float | None = None) -> None:
    """One calc task: a root span with the gold answer as metadata, an LLM call answering "42"."""
    attributes = {"tracelearn.task.id": f"t{trace}"}
    if gold is not None:
        attributes["tracelearn.metadata.gold"] = gold
    root = factory.span(trace, "calc.task", 0, 10, attributes=attributes)
    factory.llm(trace, root, 1, "what is 6*7?")
    if emitted is not None:
        factory.reward(trace, root, 9, emitted, name="correct")


def build(tmp_path: Path, factory: SpansFactory, reward: dict[str, Any]) -> RolloutBuild:
    factory.write()
    config = parse_config({"reward": reward})
    return build_closed_rollouts(scan_spans(tmp_path), LATER, rollout_config(config), reward_sources(config, tmp_path))


def by_id(result: RolloutBuild) -> dict[str, dict[str, Any]]:
    rows = result.rollouts.to_dicts()
    return {row["rollout_id"]: {**row, "rewards": {r["key"]: r["value"] for r in row["rewards"]}} for row in rows}


@pytest.fixture
def factory(tmp_path: Path) -> SpansFactory:
    return SpansFactory(tmp_path / "spans")


def test_function_reward_reads_a_metadata_key_by_parameter_name(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="42")
    task_run(factory, 2, gold="41")
    rollouts = by_id(build(tmp_path, factory, {"function": "reward_functions_fixture:exact", "name": "correct"}))
    assert rollouts[trace_hex(1)]["final_reward"] == 1.0 and rollouts[trace_hex(1)]["reward_name"] == "correct"
    assert rollouts[trace_hex(2)]["rewards"] == {"correct": 0.0}


def test_a_dict_result_gives_several_named_rewards(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="42")
    result = build(tmp_path, factory, {"function": "reward_functions_fixture:graded", "primary": "short"})
    (row,) = by_id(result).values()
    assert row["rewards"] == {"correct": 1.0, "short": 1.0}
    assert (row["reward_name"], row["final_reward"]) == ("short", 1.0)


def test_spans_and_messages_arguments(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="42")
    (row,) = by_id(build(tmp_path, factory, {"function": "reward_functions_fixture:span_count"})).values()
    assert row["rewards"] == {"span_count": 2.0}


def test_failing_rollouts_are_counted_per_cause_and_the_build_goes_on(
    tmp_path: Path, factory: SpansFactory, caplog: pytest.LogCaptureFixture
) -> None:
    for trace, gold in enumerate(["42", "boom", "nan", "text", None], 1):
        task_run(factory, trace, gold=gold)
    result = build(tmp_path, factory, {"function": "reward_functions_fixture:fragile", "missing": "drop"})
    summary = result.summary
    assert (summary.function_rewards, summary.function_reward_errors) == (1, 1)
    assert (summary.function_reward_invalid, summary.function_reward_missing_input) == (2, 1)
    assert summary.without_reward == 4 and result.rollouts.height == 1
    assert result.first_function_failure is not None and "grader crashed" in result.first_function_failure
    assert "gave no reward for 4 rollouts" in caplog.text


def test_a_parameter_default_stands_in_for_an_absent_metadata_key(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold=None)
    (row,) = by_id(build(tmp_path, factory, {"function": "reward_functions_fixture:with_default"})).values()
    assert row["final_reward"] == 1.0


def test_args_only_function_is_refused_at_load() -> None:
    with pytest.raises(RewardFunctionError, match="no named parameters"):
        load_reward_function("reward_functions_fixture:args_only", "x")


def add_feedback(tmp_path: Path, **raw: Any) -> None:
    append_feedback(tmp_path, [feedback_item(raw)])


def test_feedback_joins_by_trace_and_rollout_id_dedupes_and_the_latest_wins(
    tmp_path: Path, factory: SpansFactory
) -> None:
    task_run(factory, 1, gold="42", emitted=1.0)
    task_run(factory, 2, gold="42", emitted=0.0)
    one = trace_hex(1)
    early, late = at(100), at(200)
    add_feedback(tmp_path, feedback_id="a", trace_id=one, name="thumbs", value=0.0, time=early)
    add_feedback(tmp_path, feedback_id="b", rollout_id=one, name="thumbs", value=1.0, time=late)
    add_feedback(tmp_path, feedback_id="b", rollout_id=one, name="thumbs", value=1.0, time=late)  # redelivered
    add_feedback(tmp_path, feedback_id="c", trace_id=trace_hex(2), rollout_id=trace_hex(2), name="thumbs", value=-1.0)
    add_feedback(tmp_path, feedback_id="d", rollout_id="someone-else", name="thumbs", value=5.0)
    result = build(tmp_path, factory, {"feedback": True})
    rollouts = by_id(result)
    assert rollouts[one]["rewards"] == {"correct": 1.0, "thumbs": 1.0}
    assert rollouts[trace_hex(2)]["rewards"] == {"correct": 0.0, "thumbs": -1.0}
    assert rollouts[one]["reward_name"] == "correct", "without primary the emitted one stays primary"
    assert result.summary.feedback_rewards == 2


def test_several_sources_with_an_explicit_primary_and_the_missing_policy_after_merging(
    tmp_path: Path, factory: SpansFactory
) -> None:
    task_run(factory, 1, gold="42", emitted=0.5)
    task_run(factory, 2, gold="42", emitted=0.5)
    add_feedback(tmp_path, rollout_id=trace_hex(1), name="thumbs", value=1.0)
    reward = {"function": "reward_functions_fixture:exact", "name": "exact", "feedback": True, "primary": "thumbs"}
    rollouts = by_id(build(tmp_path, factory, {**reward, "missing": "fill", "fill_value": -1.0}))
    assert rollouts[trace_hex(1)]["rewards"] == {"correct": 0.5, "exact": 1.0, "thumbs": 1.0}
    assert (rollouts[trace_hex(1)]["reward_name"], rollouts[trace_hex(1)]["final_reward"]) == ("thumbs", 1.0)
    assert rollouts[trace_hex(2)]["final_reward"] == -1.0, "no thumbs: filled although other rewards exist"
    assert rollouts[trace_hex(2)]["rewards"] == {"correct": 0.5, "exact": 1.0}
    dropped = build(tmp_path, SpansFactory(tmp_path / "unused"), {**reward, "missing": "drop"})
    assert dropped.rollouts.get_column("rollout_id").to_list() == [trace_hex(1)]
    assert dropped.summary.without_reward == 1


def test_emitted_off_keeps_only_the_other_sources(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="41", emitted=1.0)
    (row,) = by_id(build(tmp_path, factory, {"emitted": False, "function": "reward_functions_fixture:exact"})).values()
    assert row["rewards"] == {"exact": 0.0} and row["final_reward"] == 0.0


def test_a_function_reward_overrides_an_emitted_one_of_the_same_name(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="41", emitted=1.0)
    (row,) = by_id(build(tmp_path, factory, {"function": "reward_functions_fixture:exact", "name": "correct"})).values()
    assert row["rewards"] == {"correct": 0.0} and row["final_reward"] == 0.0


def test_rewards_of_a_rollout_do_not_depend_on_the_other_rollouts_in_the_build(
    tmp_path: Path, factory: SpansFactory
) -> None:
    for trace in (1, 2, 3):
        task_run(factory, trace, gold="42", emitted=0.0)
    add_feedback(tmp_path, rollout_id=trace_hex(2), name="thumbs", value=1.0)
    factory.write()
    config = parse_config({"reward": {"function": "reward_functions_fixture:exact", "feedback": True}})
    sources = reward_sources(config, tmp_path)
    spans = scan_spans(tmp_path)
    whole = build_closed_rollouts(spans, LATER, rollout_config(config), sources).rollouts
    parts = [
        build_closed_rollouts(spans.filter(pl.col("rollout_id").is_in(ids)), LATER, rollout_config(config), sources)
        for ids in ([trace_hex(1)], [trace_hex(2), trace_hex(3)])
    ]
    assert pl.concat([p.rollouts for p in parts]).equals(whole)


def test_default_sources_leave_emitted_rewards_as_they_were(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="42", emitted=1.0)
    factory.write()
    spans = scan_spans(tmp_path)
    config = parse_config({})
    plain = build_closed_rollouts(spans, LATER, rollout_config(config))
    wired = build_closed_rollouts(spans, LATER, rollout_config(config), reward_sources(config, tmp_path))
    assert plain.rollouts.equals(wired.rollouts)
    assert dt.timedelta(0) < LATER - at(0)


def test_the_spans_argument_over_several_files_as_a_build_reads_them(tmp_path: Path) -> None:
    """The SQL example's eval crashed here: a struct of whole spans built from several files' rows
    (a build collects its bucket first) made polars panic on the map nested in ``events``."""
    factory = SpansFactory(tmp_path / "spans")
    for part in range(4):  # four files of five spans, as an exporter rolls them
        for step in range(5):
            trace = 1 + (part * 5 + step) % 3
            factory.llm(trace, None, part * 5 + step, f"question {part}.{step}", rollout_id=f"r{trace}",
                        task_id="t1")
        factory.write()
        factory.records.clear()
    spans = scan_spans(tmp_path).collect().lazy()
    config = parse_config({"reward": {"function": "reward_functions_fixture:span_count"}})
    result = build_closed_rollouts(spans, LATER, rollout_config(config), reward_sources(config, tmp_path))
    assert {row["rollout_id"]: row["final_reward"] for row in result.rollouts.to_dicts()} == {
        "r1": 7.0, "r2": 7.0, "r3": 6.0}


def test_a_reward_function_sees_every_map_of_a_span_as_a_dict(tmp_path: Path, factory: SpansFactory) -> None:
    task_run(factory, 1, gold="42")
    call = factory.records[-1]
    factory.records[-1] = dataclasses.replace(
        call, events=(("exception", call.start_ns, {"exception.type": "ValueError", "exception.message": "x"}),))
    factory.write()
    spans = scan_spans(tmp_path)
    rows, report = function_reward_rows(spans, build_rollouts(spans),
                                        load_reward_function("hostile_user_code:maps_are_dicts", "maps"))
    assert report.first_failure is None and rows["reward"].to_list() == [2.0]  # the event's two attributes


REWARD_FILE = '''
from dataclasses import dataclass  # a dataclass in the file: it must be a registered module


@dataclass
class Verdict:
    value: float


def score(answer, gold):
    return Verdict(1.0 if answer.strip() == gold else 0.0).value
'''


def test_a_reward_file_is_found_relative_to_its_config_from_any_directory(
    tmp_path: Path, factory: SpansFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``FILE.py:function``: the file next to pipeline.yaml, whatever the build's working directory, and
    not on the import path of either process (the reward worker loads it by path too)."""
    task_run(factory, 1, gold="42")
    task_run(factory, 2, gold="41")
    factory.write()
    project = tmp_path / "project"
    (project / "rewards").mkdir(parents=True)
    (project / "rewards" / "exact_file.py").write_text(REWARD_FILE, encoding="utf-8")
    (project / "pipeline.yaml").write_text("reward: {function: rewards/exact_file.py:score, name: correct}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(project / "pipeline.yaml")
    assert config.reward.function_file == (project / "rewards" / "exact_file.py").resolve()
    result = build_closed_rollouts(scan_spans(tmp_path), LATER, rollout_config(config),
                                   reward_sources(config, tmp_path))
    assert {r: row["rewards"] for r, row in by_id(result).items()} == {
        trace_hex(1): {"correct": 1.0}, trace_hex(2): {"correct": 0.0}}
    assert not any(str(project) in entry for entry in sys.path)


def test_a_config_and_its_reward_file_moved_elsewhere_hash_alike(tmp_path: Path) -> None:
    for place in ("a", "b"):
        (tmp_path / place).mkdir()
        (tmp_path / place / "reward.py").write_text(REWARD_FILE, encoding="utf-8")
        (tmp_path / place / "pipeline.yaml").write_text("reward: {function: reward.py:score}\n")
    first, second = (load_config(tmp_path / place / "pipeline.yaml") for place in ("a", "b"))
    assert first.reward.function_file != second.reward.function_file
    assert config_hash(first) == config_hash(second)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("missing.py:score", ["no such file: {dir}/missing.py", "relative to the config's directory"]),
        ("reward.py:nope", ["reward.py has no attribute 'nope'"]),
        ("no_such_package.reward:score", ["module 'no_such_package.reward' cannot be imported",
                                          "searched the import path", "e.g. reward.py:score"]),
        ("broken.py:score", ["loading the file {dir}/broken.py raised ZeroDivisionError"]),
    ],
)
def test_a_reward_function_that_cannot_be_found_names_the_config_and_what_was_tried(
    tmp_path: Path, function: str, expected: list[str]
) -> None:
    (tmp_path / "reward.py").write_text(REWARD_FILE, encoding="utf-8")
    (tmp_path / "broken.py").write_text("1 / 0\n", encoding="utf-8")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(f"reward: {{function: '{function}'}}\n")
    with pytest.raises(PipelineConfigError) as raised:
        load_config(config_file)
    message = str(raised.value)
    assert message.startswith(f"{config_file}: reward.function: ")
    for part in expected:
        assert part.format(dir=tmp_path.resolve()) in message, message
