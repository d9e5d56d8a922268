"""Token choice: nucleus filtering, greedy, seeds, and the logprobs reported."""

import asyncio

import pytest
import torch

from tracelearn.models import LoadedModel
from tracelearn.serving.engine import GenerationEngine
from tracelearn.serving.logprobs import LOGPROB_FLOOR, logprobs_body
from tracelearn.serving.sampling import (
    GREEDY_BELOW_TEMPERATURE,
    SamplingParams,
    TokenChoice,
    make_generator,
    nucleus_filter,
    sample_token,
    sampling_logprobs,
    score_token,
    seed_for,
)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    return sample_token(logits, params, generator).token_id


def test_nucleus_filter_keeps_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    # 0.5 + 0.3 = 0.8 reaches top_p = 0.8: keep those two, renormalized.
    assert torch.allclose(nucleus_filter(probs, 0.8), torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert torch.allclose(nucleus_filter(probs, 0.81), torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)
    assert torch.allclose(nucleus_filter(probs, 0.1), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # never empty


def test_greedy_takes_the_argmax_and_seeds_reproduce_samples() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert choose_token(logits, SamplingParams(max_tokens=1, temperature=0), make_generator(None)) == 1
    params = SamplingParams(max_tokens=1, temperature=1.5, seed=5)
    first = [choose_token(logits, params, g) for g in [make_generator(5)] for _ in range(20)]
    second = [choose_token(logits, params, g) for g in [make_generator(5)] for _ in range(20)]
    assert first == second
    assert len(set(first)) > 1
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.4)  # token 1 alone holds ~0.45
    assert {choose_token(logits, nucleus, make_generator(s)) for s in range(30)} == {1}


def test_logprobs_are_the_sampled_distributions_temperature_and_nucleus_applied() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    raw = torch.log_softmax(logits, dim=-1)
    # temperature 1, no nucleus: the model's own distribution (vLLM's raw and processed logprobs agree)
    assert torch.allclose(sampling_logprobs(logits, SamplingParams(max_tokens=1)), raw)
    # temperature 0.7: what a trainer recomputes as log_softmax(logits / 0.7) with the recorded temperature
    warm = SamplingParams(max_tokens=1, temperature=0.7, seed=3)
    expected = torch.log_softmax(logits / 0.7, dim=-1)
    assert torch.allclose(sampling_logprobs(logits, warm), expected)
    for seed in range(20):
        choice = sample_token(logits, warm, make_generator(seed))
        assert choice.logprob == pytest.approx(float(expected[choice.token_id]))
    # top-p 0.9 at temperature 0.7: tokens 1 and 3 hold the nucleus, renormalized; the others cannot be drawn
    nucleus = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_logprobs=4)
    kept = torch.tensor([1, 3])
    renormalized = expected[kept] - torch.logsumexp(expected[kept], dim=0)
    reported = sampling_logprobs(logits, nucleus)
    assert torch.allclose(reported[kept], renormalized)
    assert reported[0] == reported[2] == float("-inf")
    assert float(torch.logsumexp(reported, dim=0)) == pytest.approx(0.0, abs=1e-6)  # a distribution
    for seed in range(20):
        choice = sample_token(logits, nucleus, make_generator(seed))
        assert choice.token_id in (1, 3) and choice.logprob == pytest.approx(float(reported[choice.token_id]))
    # greedy reports the unscaled distribution, as vLLM does
    assert torch.allclose(sampling_logprobs(logits, SamplingParams(max_tokens=1, temperature=0)), raw)


def test_the_api_floors_a_zero_probability_at_vllms_minus_9999() -> None:
    class Texts:
        def entry(self, token_id: int) -> tuple[str, tuple[int, ...]]:
            return str(token_id), (48 + token_id,)

    choice = TokenChoice(1, -0.5, ((1, -0.5), (0, float("-inf"))))
    [entry] = logprobs_body([choice], Texts())["content"]  # type: ignore[arg-type]
    assert entry["logprob"] == -0.5
    assert [alternative["logprob"] for alternative in entry["top_logprobs"]] == [-0.5, LOGPROB_FLOOR]


def test_score_token_reports_the_given_logprob_and_top_alternatives() -> None:
    logprobs = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), dim=-1)
    choice = score_token(logprobs, 0, top_k=2)
    assert choice.token_id == 0
    assert choice.logprob == pytest.approx(float(logprobs[0]))
    assert [i for i, _ in choice.top_logprobs] == [2, 1]
    assert score_token(logprobs, 2, top_k=0).top_logprobs == ()


@pytest.mark.parametrize(
    "bad",
    [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_logprobs": -1}, {"stop": ("",)}],
)
def test_invalid_sampling_params_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**{"max_tokens": 4, **bad})  # type: ignore[arg-type]


def test_a_vanishing_temperature_is_greedy_and_never_produces_nan() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    for temperature in (1e-300, 1e-6, 5e-324):
        params = SamplingParams(max_tokens=1, temperature=temperature)
        assert params.greedy and choose_token(logits, params, make_generator(0)) == 1
    smallest_sampled = SamplingParams(max_tokens=1, temperature=GREEDY_BELOW_TEMPERATURE)
    assert not smallest_sampled.greedy
    assert choose_token(logits, smallest_sampled, make_generator(0)) == 1  # finite, and as sharp as greedy


def test_seeds_wrap_into_the_generators_64_bits() -> None:
    assert seed_for(7) == 7 and seed_for(7, 2) == 9
    assert seed_for(2**64 - 1, 1) == 0 and seed_for(-1) == 2**64 - 1
    make_generator(seed_for(-(2**63)))  # the extremes the API accepts are valid generator seeds
    make_generator(seed_for(2**64 - 1, 127))
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(max_tokens=1, seed=2**64)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=1, temperature=float("nan"))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_engine_reports_what_a_trainer_recomputes_at_the_recorded_temperature(
    engine: GenerationEngine, tiny_model: LoadedModel, top_p: float
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.7, top_p=top_p, seed=11)
    prompt = tiny_model.tokenizer.encode("the cat reads the question.")
    result = asyncio.run(engine.generate(prompt, params))
    with torch.no_grad():
        logits = tiny_model.model(torch.tensor([prompt + result.token_ids])).logits[0].float()
    # position p's logits predict token p + 1: the rows that predicted each generated token
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(result.token_ids)]
    steps = list(zip(rows, result.token_ids, strict=True))
    recomputed = [float(torch.log_softmax(row / 0.7, dim=-1)[token]) for row, token in steps]
    expected = [float(sampling_logprobs(row, params)[token]) for row, token in steps]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    if top_p == 1.0:  # the GRPO ratio at the first step is exp(recomputed - recorded) = 1
        assert result.logprobs == pytest.approx(recomputed, abs=1e-4)
