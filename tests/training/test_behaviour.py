"""The GRPO trainer uses how each transition was sampled: logprobs at the recorded temperature (data the
embedded engine sampled at 0.7 starts at a ratio of 1), truncated sampling kept or dropped, and
transitions of another model version weighed by truncated importance weights or dropped, all counted."""

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from support.tiny_model import build_tiny_model
from support.transitions_factory import CONFIG_HASH, encode
from transformers import AutoModelForCausalLM, AutoTokenizer

from tracelearn.models import load_model, resolve_model
from tracelearn.pipelines.build import output_file_name
from tracelearn.schemas.migrations import conform
from tracelearn.schemas.tables import TRANSITIONS
from tracelearn.storage.atomic_parquet import write_parquet_atomically
from tracelearn.training.config import parse_train_config
from tracelearn.training.grpo import train_grpo

OTHER_VERSION = "calc-policy@1+000000000000"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def start_version(tiny: Path) -> str:
    """The version ``tracelearn serve`` reports for the tiny model (and the trainer starts from)."""
    return load_model(resolve_model(str(tiny)), device="cpu").model_version


def row(number: int, prompt: list[int], response: list[int], logprobs: list[float] | None, advantage: float,
        **sampling: Any) -> dict[str, Any]:
    return {
        "rollout_id": f"r{number}", "task_id": f"t{number // 2}", "group_id": f"t{number // 2}", "step_index": 0,
        "prompt_token_ids": prompt, "response_token_ids": response, "response_logprobs": logprobs,
        "token_ids_source": "server", "reward": max(advantage, 0.0), "advantage": advantage,
        "trace_id": f"{number:032x}", "span_id": f"{number:016x}", "pipeline_config_hash": CONFIG_HASH, **sampling,
    }


def write_rows(root: Path, rows: list[dict[str, Any]]) -> None:
    table = conform(pa.Table.from_pylist(rows, schema=TRANSITIONS.schema), TRANSITIONS)
    write_parquet_atomically(table, root / "transitions" / "date=2026-11-20", output_file_name(CONFIG_HASH), "zstd")


def one_step(**sections: Any) -> Any:
    """One optimizer step over at most 8 sequences, float32 (the ratio is compared to 1e-4)."""
    return parse_train_config({"grpo": {"learning_rate": 1e-3, "epochs": 1, "mini_batch_size": 8},
                               "runtime": {"precision": "fp32", "device": "cpu"}, **sections})


def start_logprobs(model: Any, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """The response tokens' logprobs under ``model`` at ``temperature``, computed here, apart from the trainer."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)] / temperature
    return rows.log_softmax(-1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_data_the_engine_sampled_at_temperature_07_starts_at_a_ratio_of_1(tiny: Path, start_version: str,
                                                                          tmp_path: Path) -> None:
    from tracelearn.serving.engine import GenerationEngine
    from tracelearn.serving.sampling import SamplingParams

    loaded = load_model(resolve_model(str(tiny)), device="cpu")
    engine = GenerationEngine(loaded, max_batch_size=8)
    try:
        rows = []
        for number in range(8):
            prompt, _ = encode(loaded.tokenizer, f"What is {number // 2} plus 4?", "")
            params = SamplingParams(max_tokens=8, temperature=0.7, seed=number)
            result = asyncio.run(engine.generate(prompt, params))
            assert result.model_version == start_version
            rows.append(row(number, prompt, result.token_ids, result.logprobs, 1.0 if number % 2 else -1.0,
                            temperature=0.7, top_p=1.0, model_version=result.model_version))
    finally:
        engine.close()
    write_rows(tmp_path / "warm", rows)
    write_rows(tmp_path / "unknown", [{**r, "temperature": None} for r in rows])

    warm = train_grpo(tmp_path / "warm", str(tiny), tmp_path / "run-warm", one_step(), progress=False)
    first = warm.run.read_metrics()[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-4) and first["clip_fraction"] == 0
    assert warm.summary["logprobs_recomputed"] == 0  # the engine's logprobs are the denominator
    assert warm.summary["sampling"]["temperatures"] == {"0.7": 8}
    assert warm.summary["off_policy"]["on_policy"] == 8 and warm.summary["off_policy"]["start_version"] == start_version

    # Without the recorded temperature the trainer divides by 1: the same data no longer starts at 1.
    unknown = train_grpo(tmp_path / "unknown", str(tiny), tmp_path / "run-unknown", one_step(), progress=False)
    assert abs(unknown.run.read_metrics()[0]["ratio_mean"] - 1.0) > 1e-2
    assert unknown.summary["sampling"]["temperature_unknown"] == 8


def off_policy_rows(tiny: Path, start_version: str) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """4 on-policy rows (no logprobs recorded: recomputed) and 4 of another version, recording -1 (weights
    below 1) or -30 per token (weights at the cap); returns the rows and each row's starting logprobs."""
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    rows, starts = [], []
    for number in range(8):
        prompt, response = encode(tokenizer, f"What is {number // 2} plus 4?", "4" if number % 2 else "the cat")
        off = number >= 4
        recorded = [-1.0 if number % 4 < 2 else -30.0] * len(response) if off else None
        rows.append(row(number, prompt, response, recorded, 1.0 if number % 2 else -1.0, temperature=1.0,
                        model_version=OTHER_VERSION if off else start_version))
        starts.append(start_logprobs(model, prompt, response))
    return rows, starts


def test_another_versions_transitions_get_truncated_importance_weights(tiny: Path, start_version: str,
                                                                       tmp_path: Path) -> None:
    rows, starts = off_policy_rows(tiny, start_version)
    write_rows(tmp_path / "data", rows)
    cap = 2.0
    result = train_grpo(tmp_path / "data", str(tiny), tmp_path / "run",
                        one_step(off_policy={"mode": "importance", "cap": cap}), progress=False)

    # Independently: w = min(exp(start - recorded), cap) per token; 1 on on-policy rows.
    weights = [torch.ones_like(start) if r["response_logprobs"] is None
               else torch.clamp(torch.exp(start - torch.tensor(r["response_logprobs"])), max=cap)
               for r, start in zip(rows, starts, strict=True)]
    off_weights = torch.cat(weights[4:])
    summary = result.summary["off_policy"]
    assert summary["mode"] == "importance" and summary["on_policy"] == 4 and summary["off_policy_weighted"] == 4
    assert summary["versions"] == {OTHER_VERSION: 4, start_version: 4}
    assert summary["weight_mean"] == pytest.approx(float(off_weights.mean()), abs=1e-4)
    assert 0 < summary["weight_capped_fraction"] < 1 and float(off_weights.min()) < 0.5
    # At the first step every ratio is 1 (off-policy rows' denominator is the starting weights), so the
    # policy-gradient loss is -sum(A * w) / tokens: the weights are in the loss.
    first = result.run.read_metrics()[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    tokens = sum(len(w) for w in weights)
    expected = -sum(r["advantage"] * float(w.sum()) for r, w in zip(rows, weights, strict=True)) / tokens
    assert first["pg_loss"] == pytest.approx(expected, abs=1e-5)
    assert result.summary["logprobs_recomputed"] == 4  # the on-policy rows without logprobs only


def test_drop_leaves_other_versions_out_and_keep_treats_them_as_on_policy(tiny: Path, start_version: str,
                                                                          tmp_path: Path) -> None:
    rows, _ = off_policy_rows(tiny, start_version)
    write_rows(tmp_path / "data", rows)
    dropped = train_grpo(tmp_path / "data", str(tiny), tmp_path / "drop", one_step(off_policy={"mode": "drop"}),
                         progress=False)
    assert dropped.summary["off_policy"]["off_policy_dropped"] == 4
    assert dropped.summary["sequences"]["dropped"] == {"off_policy": 4} and dropped.summary["sequences"]["kept"] == 4
    assert dropped.run.read_metrics()[0]["sequences"] == 4

    kept = train_grpo(tmp_path / "data", str(tiny), tmp_path / "keep", one_step(off_policy={"mode": "keep"}),
                      progress=False)
    assert kept.summary["off_policy"]["off_policy_kept"] == 4 and kept.summary["off_policy"]["weight_mean"] is None
    # Their recorded logprobs are the denominator: far from the model's, so the ratio is far from 1.
    assert kept.run.read_metrics()[0]["ratio_max"] > 10


def test_truncated_sampling_is_kept_or_dropped_and_counted(tiny: Path, start_version: str, tmp_path: Path) -> None:
    rows, _ = off_policy_rows(tiny, start_version)
    rows = [{**r, "model_version": start_version, "response_logprobs": None,
             "top_p": 0.9 if n < 2 else None, "top_k": 20 if n == 2 else None} for n, r in enumerate(rows)]
    write_rows(tmp_path / "data", rows)
    kept = train_grpo(tmp_path / "data", str(tiny), tmp_path / "keep", one_step(), progress=False)
    assert kept.summary["sampling"]["truncated_kept"] == 3 and kept.summary["sequences"]["kept"] == 8
    dropped = train_grpo(tmp_path / "data", str(tiny), tmp_path / "drop", one_step(sampling={"truncated": "drop"}),
                         progress=False)
    assert dropped.summary["sampling"]["truncated_dropped"] == 3
    assert dropped.summary["sequences"]["dropped"] == {"truncated_sampling": 3}
    summary = json.loads(dropped.run.summary_path.read_text())
    assert summary["sampling"] == dropped.summary["sampling"]


def test_the_importance_weight_is_capped_before_exp() -> None:
    from tracelearn.training.losses import importance_weights

    start = torch.tensor([-2.0, -2.0, -2.0])
    recorded = torch.tensor([-1.0, -2.5, -9999.0])  # the server's floor for a token outside the nucleus
    weights = importance_weights(start, recorded, cap=2.0)
    assert weights.tolist() == pytest.approx([math.exp(-1.0), math.exp(0.5), 2.0])
