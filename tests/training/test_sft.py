"""SFT on good transitions: only rewarded replies are learned, only their response tokens carry loss."""

import json
from pathlib import Path

import pytest
from support.tiny_model import build_tiny_model
from support.transitions_factory import Sample, reply_logprob, write_transitions
from transformers import AutoTokenizer

from tracelearn.training.config import parse_train_config
from tracelearn.training.data import NoTrainingDataError
from tracelearn.training.sequences import SequenceCounts, TokenSequence
from tracelearn.training.sft import IGNORE_INDEX, ResponseOnlyCollator, SftExamples, select_sft_sequences, train_sft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def sequence(prompt: list[int], response: list[int], reward: float, mask: list[int] | None = None) -> TokenSequence:
    return TokenSequence(prompt, response, mask or [1] * len(response), 0.0, reward, None, False, "r", "t", "s")


def test_labels_cover_the_response_tokens_the_loss_mask_keeps() -> None:
    examples = SftExamples([sequence([1, 2, 3], [7, 8, 9], 1.0, mask=[1, 0, 1]), sequence([4], [5], 1.0)])
    batch = ResponseOnlyCollator(pad_id=0)([examples[0], examples[1]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9], [4, 5, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3 + [7, IGNORE_INDEX, 9],
                                        [IGNORE_INDEX, 5] + [IGNORE_INDEX] * 4]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]


def test_selection_keeps_rewarded_sequences_once() -> None:
    counts = SequenceCounts(transitions=4)
    good = sequence([1], [2], 1.0)
    chosen = select_sft_sequences([good, sequence([1], [2], 1.0), sequence([1], [3], 0.0), sequence([1], [4], 0.9)],
                                  counts, min_reward=1.0, keep_duplicates=False)
    assert chosen == [good]
    assert counts.dropped == {"below_min_reward": 2, "duplicate": 1} and counts.kept == 1


def test_sft_learns_the_rewarded_reply_and_not_the_other(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    samples = []
    for task in range(6):
        question = f"What is {task} plus 4?"
        samples += [Sample(question, "4", 0.0, 1.0, f"t{task}"),
                    Sample(question, "the cat reads", 0.0, 0.0, f"t{task}")]
    write_transitions(tmp_path / "data", tokenizer, samples)
    config = parse_train_config({"sft": {"learning_rate": 3e-3, "epochs": 4, "batch_size": 3},
                                 "runtime": {"precision": "fp32"}})
    result = train_sft(tmp_path / "data", str(tiny), tmp_path / "run", config, progress=False)

    assert result.summary["sequences"]["kept"] == 6
    assert result.summary["sequences"]["dropped"] == {"below_min_reward": 6}
    question = "What is 9 plus 4?"
    assert reply_logprob(result.checkpoint, question, "4") > reply_logprob(tiny, question, "4") + 1.0
    losses = [m["loss"] for m in result.run.read_metrics()]
    assert len(losses) == 8 and losses[-1] < losses[0]  # 6 examples / batch 3 = 2 steps x 4 epochs
    lineage = json.loads(result.run.lineage_path.read_text())
    assert lineage["extra"]["trainer"] == "sft" and lineage["extra"]["min_reward"] == 1.0
    assert result.run.plot_path.exists()
    assert (result.checkpoint / "model.safetensors").exists()  # full weights: a plain transformers directory


def test_nothing_above_the_threshold_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    write_transitions(tmp_path / "data", tokenizer, [Sample("What is 1 plus 1?", "3", 0.0, 0.0)])
    with pytest.raises(NoTrainingDataError, match="--min-reward"):
        train_sft(tmp_path / "data", str(tiny), tmp_path / "run", parse_train_config(None), progress=False)
