"""The torch GRPO trainer on a tiny model: it learns in the right direction, and its run is complete."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from support.tiny_model import build_tiny_model
from support.transitions_factory import CONFIG_HASH, Sample, reply_logprob, write_transitions
from transformers import AutoTokenizer

from tracelearn.models import resolve_model
from tracelearn.registry import open_registry
from tracelearn.training.config import parse_train_config
from tracelearn.training.data import NoTrainingDataError
from tracelearn.training.grpo import train_grpo
from tracelearn.training.run_dir import RunDirectoryError

GOOD, BAD = "4", "the cat reads the weather"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def contrast_samples(tasks: int = 4) -> list[Sample]:
    """Per task one right reply (advantage +1) and one wrong (-1): a GRPO group of two."""
    samples = []
    for task in range(tasks):
        question = f"What is {task} plus 4?"
        samples += [Sample(question, GOOD, 1.0, 1.0, f"t{task}"), Sample(question, BAD, -1.0, 0.0, f"t{task}")]
    return samples


def config(**grpo: object) -> object:
    base = {"learning_rate": 3e-3, "epochs": 4, "mini_batch_size": 8, "recompute_logprobs": "always"}
    return parse_train_config({"grpo": {**base, **grpo}, "runtime": {"precision": "fp32"}})


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_raises_good_replies_and_lowers_bad_ones(tiny: Path, tmp_path: Path, lora: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    write_transitions(tmp_path / "data", tokenizer, contrast_samples())
    settings = parse_train_config({"grpo": {"learning_rate": 1e-2 if lora else 3e-3, "epochs": 4, "mini_batch_size": 8,
                                            "recompute_logprobs": "always"},
                                   "lora": {"r": 8, "alpha": 16} if lora else None, "runtime": {"precision": "fp32"}})
    result = train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", settings, progress=False)

    question = "What is 9 plus 4?"  # a task the run never saw: the change generalizes over the prompt
    before_good, before_bad = reply_logprob(tiny, question, GOOD), reply_logprob(tiny, question, BAD)
    after_good = reply_logprob(result.checkpoint, question, GOOD)
    after_bad = reply_logprob(result.checkpoint, question, BAD)
    assert after_good > before_good + 0.5
    assert after_bad < before_bad - 0.5
    if lora:
        adapter = json.loads((result.checkpoint / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(tiny.resolve())
        assert resolve_model(str(result.checkpoint)).base is not None  # the server loads it onto its base


def test_the_run_directory_holds_config_metrics_plot_checkpoint_and_lineage(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    written = write_transitions(tmp_path / "data", tokenizer, contrast_samples())
    result = train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", config(epochs=2), progress=False)
    run = result.run

    steps = run.read_metrics()
    assert [m["step"] for m in steps] == [1, 2]  # 8 sequences, mini-batch 8, 2 epochs
    assert {"loss", "pg_loss", "clip_fraction", "kl_to_behaviour", "grad_norm", "tokens_per_second"} <= steps[0].keys()
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # logprobs recomputed with the starting weights
    assert run.plot_path.stat().st_size > 10_000
    summary = json.loads(run.summary_path.read_text())
    assert summary["sequences"]["kept"] == 8 and summary["logprobs_recomputed"] == 8
    lineage = json.loads(run.lineage_path.read_text())
    assert lineage["pipeline_config_hash"] == CONFIG_HASH
    assert lineage["partitions"] == ["date=2026-11-20"]
    assert len(lineage["dataset_snapshot"]) == 64 and lineage["base_model"] == str(tiny.resolve())
    assert lineage["extra"]["trainer"] == "grpo" and lineage["training_run_id"] == summary["run_id"]
    assert written.exists()

    # The checkpoint and its lineage publish as they are.
    registry = open_registry(tmp_path / "registry")
    published = registry.publish("checkpoint", "calc-policy", result.checkpoint, lineage=result.lineage)
    assert published.version.lineage.dataset_snapshot == lineage["dataset_snapshot"]

    with pytest.raises(RunDirectoryError, match="--overwrite"):
        train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", config(epochs=2), progress=False)


def test_recorded_logprobs_are_the_ratio_denominator_and_missing_ones_are_recomputed(tiny: Path,
                                                                                     tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    samples = contrast_samples(2)
    samples[0] = Sample(samples[0].question, GOOD, 1.0, 1.0, "t0", logprob=None)  # the server sent no logprobs
    write_transitions(tmp_path / "data", tokenizer, samples)
    result = train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", config(recompute_logprobs="missing", epochs=1),
                        progress=False)
    assert result.summary["logprobs_recomputed"] == 1
    # The other rows recorded -1.0 per token, far from the random model's ~-6.7: the ratio shows it.
    first = result.run.read_metrics()[0]
    assert first["ratio_mean"] < 0.5 and first["clip_fraction"] > 0


def test_rows_without_token_ids_are_retokenized_and_counted(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    samples = [Sample(s.question, s.reply, s.advantage, s.reward, s.task_id, with_token_ids=(n % 2 == 0))
               for n, s in enumerate(contrast_samples(2))]
    write_transitions(tmp_path / "data", tokenizer, samples)
    result = train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", config(epochs=1), progress=False)
    assert result.summary["sequences"]["retokenized"] == 2 and result.summary["sequences"]["kept"] == 4


def test_micro_batches_accumulate_to_the_same_step(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    write_transitions(tmp_path / "data", tokenizer, contrast_samples())
    losses = []
    for budget in (16, 100_000):  # one sequence per pass vs the whole step in one pass
        settings = parse_train_config({"grpo": {"epochs": 1, "mini_batch_size": 8, "recompute_logprobs": "always",
                                                "loss_aggregation": "seq_mean"},
                                       "runtime": {"precision": "fp32", "micro_batch_tokens": budget}})
        result = train_grpo(tmp_path / "data", str(tiny), tmp_path / f"run-{budget}", settings, progress=False)
        first = result.run.read_metrics()[0]
        losses.append((first["loss"], first["grad_norm"], first["micro_batches"]))
    (small_loss, small_norm, small_passes), (big_loss, big_norm, big_passes) = losses
    assert small_passes == 8 and big_passes == 1
    assert small_loss == pytest.approx(big_loss, abs=1e-5) and small_norm == pytest.approx(big_norm, rel=1e-3)


def test_kl_to_the_reference_is_computed_when_beta_is_set(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    write_transitions(tmp_path / "data", tokenizer, contrast_samples(2))
    settings = config(kl_beta=0.1, epochs=3, mini_batch_size=4)
    result = train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", settings, progress=False)
    kls = [m["kl"] for m in result.run.read_metrics()]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # step 1 starts at the reference
    assert kls[-1] > 0


def test_groups_without_signal_are_refused_with_a_clear_reason(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    write_transitions(tmp_path / "data", tokenizer, [Sample("What is 1 plus 1?", "2", 0.0, 1.0)] * 3)
    with pytest.raises(NoTrainingDataError, match="--samples"):
        train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", config(), progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_a_newer_transitions_schema_is_refused(tiny: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    written = write_transitions(tmp_path / "data", tokenizer, contrast_samples(1))
    table = pq.read_table(written)
    metadata = {**table.schema.metadata, b"tracelearn.schema_version": b"99"}
    pq.write_table(table.replace_schema_metadata(metadata), written)
    with pytest.raises(Exception, match="99"):
        train_grpo(tmp_path / "data", str(tiny), tmp_path / "run", config(), progress=False)


def test_a_shared_prompt_prefix_computed_once_gives_the_same_logprobs_and_gradients(tiny: Path) -> None:
    from support.transitions_factory import encode

    from tracelearn.training.config import RuntimeConfig
    from tracelearn.training.policy import MicroBatch, load_policy
    from tracelearn.training.sequences import TokenSequence

    policy = load_policy(str(tiny), None, RuntimeConfig(precision="fp32"))
    tokenizer = policy.tokenizer
    system = "You are a careful calculator. Think, then answer with the number only. " * 3
    sequences = []
    for number, reply in enumerate(["4", "the cat reads the weather", "12"]):
        prompt, response = encode(tokenizer, f"What is {number} plus 4?", reply)
        prefix = tokenizer.encode(system, add_special_tokens=False)
        sequences.append(TokenSequence(prefix + prompt, response, [1] * len(response), 1.0, 1.0, None, False,
                                       f"r{number}", "t", "s"))
    pad = int(tokenizer.pad_token_id)
    results = []
    for share in (None, 16):
        batch = MicroBatch.of(sequences, pad, policy.device, min_shared_prefix=share)
        policy.model.zero_grad()
        values = policy.logprobs(batch)
        (values.sum()).backward()
        gradient = next(p for p in policy.model.parameters() if p.grad is not None).grad.clone()
        results.append((values.detach(), gradient, batch.computed_tokens))
    (full, full_grad, full_tokens), (shared, shared_grad, shared_tokens) = results
    assert torch.allclose(full, shared, atol=1e-4)
    assert torch.allclose(full_grad, shared_grad, atol=1e-4, rtol=1e-3)
    assert shared_tokens < full_tokens * 0.6  # the prefix ran once instead of three times
