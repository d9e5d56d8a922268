"""What a training run reads: transitions without any reward are refused, naming the config key to set."""

from pathlib import Path

import pytest
from support.spans_factory import SpansFactory, at

from tracelearn.pipelines.build import build_transitions
from tracelearn.training.data import NoTrainingDataError, load_training_data


def build(tmp_path: Path, reward: float | None) -> Path:
    factory = SpansFactory(tmp_path / "data" / "spans")
    root = factory.root(1, 0, 10)
    factory.llm(1, root, 1, user="What is 2 plus 2?")
    if reward is not None:
        factory.reward(1, root, 9, reward)
    factory.write()
    build_transitions(tmp_path / "data", tmp_path / "out", now=at(3600))
    return tmp_path / "out"


def test_transitions_without_rewards_are_refused_naming_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(NoTrainingDataError, match=r"set reward\.function \(module:function\) in pipeline\.yaml"):
        load_training_data(build(tmp_path, reward=None))


def test_transitions_with_a_reward_load(tmp_path: Path) -> None:
    data = load_training_data(build(tmp_path, reward=1.0))
    assert data.frame.height == 1 and data.frame.get_column("reward").to_list() == [1.0]
