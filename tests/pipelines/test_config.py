"""pipeline.yaml: defaults, a full example, field validation with precise errors, the config hash."""

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from tracelearn.pipelines.config import (
    AdvantageConfig,
    ConversationConfig,
    CreditConfig,
    PipelineConfig,
    PipelineConfigError,
    RewardConfig,
    SelectConfig,
    WatermarkConfig,
    config_hash,
    join_config,
    load_config,
    parse_config,
    rollout_config,
)
from tracelearn.pipelines.rollout_identity import JoinConfig
from tracelearn.pipelines.stages import StageSpec

FULL_EXAMPLE = """\
select: {agent: "writer|planner", llm_call: "chat"}
reward: {function: user_stages_fixture.good:score, name: correct}   # reward engine
stages: [drop_failed_rollouts, {user_stages_fixture.good:keep_agent: {agent: writer}}, {dedupe_by_prompt: {keep: last}}]
credit: {method: discounted, gamma: 0.9}
advantage: {method: grpo, group_by: task_id, normalize_std: true, level: rollout}
watermark: {lateness_seconds: 30}
trajectory: false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_issue_defaults() -> None:
    config = load_config(None)
    assert config == PipelineConfig()
    assert config.select == SelectConfig(agent=None, llm_call=None)  # every LLM call of every agent
    assert config.reward == RewardConfig(
        emitted=True, feedback=False, primary=None, missing="keep"
    )  # first emitted; no reward configured, so rollouts without one are kept (a first build yields transitions)
    assert config.stages == ()
    assert config.credit == CreditConfig(method="identical", gamma=1.0)
    assert config.advantage == AdvantageConfig(
        method="grpo", group_by=("task_id",), normalize_std=True, level="rollout"
    )
    assert config.watermark == WatermarkConfig(lateness_seconds=600.0)
    assert config.conversation == ConversationConfig(window_seconds=600.0, sequence_gap_seconds=30.0)
    assert parse_config({}) == config
    assert rollout_config(config).missing_reward == "keep"
    assert join_config(config) == JoinConfig(window=dt.timedelta(minutes=10), gap=dt.timedelta(seconds=30))
    with_function = parse_config({"reward": {"function": "user_stages_fixture.good:score"}})
    assert rollout_config(with_function).missing_reward == "drop", "a configured reward source drops by default"


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing configured\n")) == PipelineConfig()


def test_full_yaml_example_parses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_EXAMPLE))
    assert config.select == SelectConfig(agent="writer|planner", llm_call=("chat",))
    assert config.reward == RewardConfig(
        emitted=True, function="user_stages_fixture.good:score", name="correct", primary="correct", missing="drop"
    )
    assert config.stages == (
        StageSpec("drop_failed_rollouts"),
        StageSpec("user_stages_fixture.good:keep_agent", {"agent": "writer"}),
        StageSpec("dedupe_by_prompt", {"keep": "last"}),
    )
    assert config.credit == CreditConfig(method="discounted", gamma=0.9)
    assert rollout_config(config).lateness == dt.timedelta(seconds=30)


def test_several_reward_sources_at_once_with_an_explicit_primary() -> None:
    config = parse_config(
        {
            "reward": {
                "function": "user_stages_fixture.good:score",
                "name": "exact",
                "feedback": True,
                "primary": "thumbs",
            }
        }
    )
    assert config.reward == RewardConfig(
        emitted=True,
        function="user_stages_fixture.good:score",
        name="exact",
        feedback=True,
        primary="thumbs",
        missing="drop",
    )


def test_reward_function_name_defaults_to_the_function_name_and_fill_value_to_zero() -> None:
    config = parse_config({"reward": {"function": "user_stages_fixture.good:score", "missing": "fill"}})
    assert (config.reward.name, config.reward.primary, config.reward.fill_value) == ("score", "score", 0.0)
    assert rollout_config(config).missing_reward == "fill"


@pytest.mark.parametrize(
    ("raw", "key", "fragments"),
    [
        ({"credits": {"method": "identical"}}, "credits", ["unknown key 'credits'", "credit"]),
        ({"credit": {"methd": "identical"}}, "credit.methd", ["unknown key 'methd'", "method"]),
        ({"credit": {"method": "monte_carlo"}}, "credit.method", ["'monte_carlo' is unknown", "identical, discounted"]),
        ({"credit": {"method": "discounted", "gamma": 1.5}}, "credit.gamma", ["1.5 is out of range", "(0, 1]"]),
        ({"credit": {"method": "discounted", "gamma": 0}}, "credit.gamma", ["0 is out of range"]),
        ({"credit": {"method": "discounted", "gamma": "high"}}, "credit.gamma", ["'high' must be a finite number"]),
        ({"credit": {"method": "discounted"}}, "credit.gamma", ["is required by method 'discounted'"]),
        (
            {"credit": {"method": "identical", "gamma": 0.9}},
            "credit.gamma",
            ["0.9 is only used by method 'discounted'"],
        ),
        ({"credit": {"include_final_reward": False}}, "credit.include_final_reward", ["only used by method 'process'"]),
        (
            {"select": {"agent": "writer(|planner"}},
            "select.agent",
            ["'writer(|planner' is not a valid regular expression"],
        ),
        ({"select": {"llm_call": []}}, "select.llm_call", ["[] must be a name or a non-empty list"]),
        ({"select": "writer"}, "select", ["'writer' must be a mapping"]),
        ({"reward": {"function": "user_stages_fixture.nope:score"}}, "reward.function", ["cannot be imported"]),
        ({"reward": {"function": "user_stages_fixture.good:nope"}}, "reward.function", ["has no attribute 'nope'"]),
        ({"reward": {"function": "user_stages_fixture.good:NOT_CALLABLE"}}, "reward.function", ["not a function"]),
        ({"reward": {"function": "score"}}, "reward.function", ["malformed import path"]),
        ({"reward": {"source": "function"}}, "reward.source", ["is replaced by one key per source", "feedback:"]),
        ({"reward": {"name": "correct"}}, "reward.name", ["set reward.function too"]),
        ({"reward": {"emitted": False}}, "reward", ["no reward source"]),
        ({"reward": {"emitted": "yes"}}, "reward.emitted", ["'yes' must be true or false"]),
        ({"reward": {"feedback": 1}}, "reward.feedback", ["must be true or false"]),
        ({"reward": {"emitted": False, "feedback": True}}, "reward.primary", ["required when feedback is the only"]),
        ({"reward": {"function": "reward_functions_fixture:args_only"}}, "reward.function", ["no named parameters"]),
        ({"reward": {"function": "reward_functions_fixture:positional_only"}}, "reward.function", ["positional-only"]),
        ({"reward": {"missing": "ignore"}}, "reward.missing", ["'ignore' is unknown", "drop, keep, fill"]),
        ({"reward": {"fill_value": 1.0}}, "reward.fill_value", ["only used with reward.missing 'fill'"]),
        ({"advantage": {"level": "token"}}, "advantage.level", ["'token' is unknown", "rollout, transition"]),
        ({"advantage": {"method": "ppo"}}, "advantage.method", ["'ppo' is unknown", "grpo"]),
        ({"advantage": {"normalize_std": "yes please"}}, "advantage.normalize_std", ["must be true or false"]),
        ({"advantage": {"epsilon": -1}}, "advantage.epsilon", ["-1 must be >= 0"]),
        ({"advantage": {"group_by": []}}, "advantage.group_by", ["non-empty list"]),
        ({"watermark": {"lateness_seconds": -5}}, "watermark.lateness_seconds", ["-5 must be >= 0"]),
        ({"conversation": {"window_seconds": -1}}, "conversation.window_seconds", ["-1 must be >= 0"]),
        ({"conversation": {"gap": 3}}, "conversation.gap", ["unknown key 'gap'", "sequence_gap_seconds"]),
        ({"trajectory": "on"}, "trajectory", ["'on' must be true or false"]),
        ({"stages": "drop_failed_rollouts"}, "stages", ["must be a list"]),
        ({"stages": ["drop_failed_rollout"]}, "stages[0]", ["did you mean drop_failed_rollouts"]),
        ({"stages": [{"a": {}, "b": {}}]}, "stages[0]", ["one-key mapping"]),
        ({"stages": ["min_reward", {"dedupe_by_prompt": {"keep": "middle"}}]}, "stages[0]", ["'threshold'"]),
        ({"stages": [{"dedupe_by_prompt": {"keep": "middle"}}]}, "stages[0]", ["keep='middle' is unknown"]),
        ({"stages": [{"user_stages_fixture.good:keep_agent": {"agnt": "w"}}]}, "stages[0]", ["'agnt'", "keep_agent"]),
    ],
)
def test_bad_config_errors_name_the_file_the_key_and_the_value(
    tmp_path: Path, raw: dict[str, Any], key: str, fragments: list[str]
) -> None:
    with pytest.raises(PipelineConfigError) as error:
        parse_config(raw, source="pipeline.yaml")
    message = str(error.value)
    assert message.startswith(f"pipeline.yaml: {key}: "), message
    assert error.value.key == key
    for fragment in fragments:
        assert fragment in message, message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(PipelineConfigError, match=r"absent\.yaml: cannot read the config file"):
        load_config(missing)
    with pytest.raises(PipelineConfigError, match=r"pipeline\.yaml: is not valid YAML"):
        load_config(write(tmp_path, "credit: {method: identical\n"))
    with pytest.raises(PipelineConfigError, match=r"pipeline\.yaml: the config must be a mapping"):
        load_config(write(tmp_path, "- identical\n"))
    with pytest.raises(PipelineConfigError, match=r"pipeline\.yaml: credit\.gamma: 2 is out of range"):
        load_config(write(tmp_path, "credit: {method: discounted, gamma: 2}\n"))


def test_config_hash_ignores_key_order_and_explicit_defaults() -> None:
    implicit = parse_config({"credit": {"method": "discounted", "gamma": 0.9}, "stages": ["drop_failed_rollouts"]})
    explicit = parse_config(
        {
            "trajectory": False,
            "stages": ["drop_failed_rollouts"],
            "advantage": {"level": "rollout", "group_by": ["task_id"], "normalize_std": True, "method": "grpo"},
            "reward": {"missing": "keep", "emitted": True, "feedback": False},
            "credit": {"gamma": 0.9, "method": "discounted"},
            "watermark": {"lateness_seconds": 600},
            "conversation": {"window_seconds": 600, "sequence_gap_seconds": 30.0},
            "select": {"agent": None},
        }
    )
    assert config_hash(implicit) == config_hash(explicit)
    assert config_hash(load_config(None)) == config_hash(parse_config({}))
    assert len(config_hash(implicit)) == 64


@pytest.mark.parametrize(
    "changed",
    [
        {"credit": {"method": "discounted", "gamma": 0.8}},
        {"credit": {"method": "identical"}},
        {"stages": ["drop_failed_rollouts", "drop_zero_signal_groups"]},
        {"stages": [{"drop_failed_rollouts": {"keep_incomplete": True}}]},
        {"advantage": {"normalize_std": False}},
        {"reward": {"feedback": True}},
        {"reward": {"emitted": False, "function": "user_stages_fixture.good:score"}},
        {"reward": {"function": "user_stages_fixture.good:score", "name": "exact"}},
        {"reward": {"primary": "correct"}},
        {"conversation": {"sequence_gap_seconds": 5}},
    ],
)
def test_config_hash_changes_when_a_parameter_changes(changed: dict[str, Any]) -> None:
    base = {"credit": {"method": "discounted", "gamma": 0.9}, "stages": ["drop_failed_rollouts"]}
    assert config_hash(parse_config(base)) != config_hash(parse_config({**base, **changed}))


def test_stage_order_changes_the_hash() -> None:
    one = parse_config({"stages": ["drop_failed_rollouts", "drop_zero_signal_groups"]})
    other = parse_config({"stages": ["drop_zero_signal_groups", "drop_failed_rollouts"]})
    assert config_hash(one) != config_hash(other)


def test_an_int_and_a_float_of_the_same_value_hash_alike() -> None:
    assert config_hash(PipelineConfig(watermark=WatermarkConfig(0))) == config_hash(
        PipelineConfig(watermark=WatermarkConfig(0.0))
    )
    assert config_hash(parse_config({"credit": {"method": "discounted", "gamma": 1}})) == config_hash(
        parse_config({"credit": {"method": "discounted", "gamma": 1.0}})
    )
