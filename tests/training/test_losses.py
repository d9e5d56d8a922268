"""The GRPO loss pieces against values computed by hand."""

import math

import pytest
import torch

from tracelearn.training.losses import aggregate_loss, k3_kl, policy_gradient_loss, token_logprobs


def test_token_logprobs_is_log_softmax_at_the_target() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[2, 0]])
    expected_first = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    values = token_logprobs(logits.to(torch.bfloat16), targets)
    assert values.dtype == torch.float32
    assert values[0, 0].item() == pytest.approx(expected_first, abs=0.02)
    assert token_logprobs(logits, targets)[0, 1].item() == pytest.approx(-math.log(3))


def test_clipped_surrogate_by_hand() -> None:
    # Ratios e^0.5 = 1.6487 (A = +1: clipped at 1.2), e^-0.5 = 0.6065 (A = -1: clipped at 0.8), e^0 = 1.
    logprobs = torch.tensor([[-0.5, -1.5, -1.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    plus = policy_gradient_loss(logprobs, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.2)
    assert plus.ratio[0].tolist() == pytest.approx([math.exp(0.5), math.exp(-0.5), 1.0])
    # A > 0: -min(r, clip(r)) -> -1.2 (clipped), -0.6065 (unclipped: the smaller), -1.
    assert plus.loss[0].tolist() == pytest.approx([-1.2, -math.exp(-0.5), -1.0])
    assert plus.clipped[0].tolist() == [1.0, 0.0, 0.0]
    minus = policy_gradient_loss(logprobs, old, torch.tensor([-1.0]), clip_low=0.2, clip_high=0.2)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.6487 (unclipped), 0.8 (clipped), 1.
    assert minus.loss[0].tolist() == pytest.approx([math.exp(0.5), 0.8, 1.0])
    assert minus.clipped[0].tolist() == [0.0, 1.0, 0.0]


def test_clipped_tokens_get_no_gradient() -> None:
    logprobs = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    terms = policy_gradient_loss(logprobs, torch.tensor([[-1.0, -1.0]]), torch.tensor([2.0]), clip_low=0.2,
                                 clip_high=0.2)
    terms.loss.sum().backward()
    assert logprobs.grad is not None
    # d(-r A)/dlogp = -r A = -2 on the unclipped token (r = 1); 0 on the clipped one.
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -2.0])


def test_k3_kl_by_hand_and_in_the_loss() -> None:
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0]])
    # log ratio ref - logp: 0 -> 0; 1 -> e - 1 - 1 = 0.71828
    assert k3_kl(logprobs, ref)[0].tolist() == pytest.approx([0.0, math.e - 2])
    terms = policy_gradient_loss(logprobs, logprobs.clone(), torch.tensor([0.0]), clip_low=0.2, clip_high=0.2,
                                 kl_beta=0.5, ref_logprobs=ref)
    assert terms.loss[0].tolist() == pytest.approx([0.0, 0.5 * (math.e - 2)])
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_gradient_loss(logprobs, logprobs, torch.tensor([0.0]), clip_low=0.2, clip_high=0.2, kl_beta=0.1)


def test_aggregations_by_hand() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token_mean: (1+2+3+4) / 4 tokens; seq_mean: (6/3 + 4/1) / 2; dr_grpo: 10 / (2 sequences * 8).
    assert aggregate_loss(loss, mask, "token_mean", step_tokens=4, step_sequences=2).item() == pytest.approx(2.5)
    assert aggregate_loss(loss, mask, "seq_mean", step_tokens=4, step_sequences=2).item() == pytest.approx(3.0)
    assert aggregate_loss(loss, mask, "dr_grpo", step_tokens=4, step_sequences=2,
                          dr_grpo_normalizer=8).item() == pytest.approx(10 / 16)
    with pytest.raises(ValueError, match="normalizer"):
        aggregate_loss(loss, mask, "dr_grpo", step_tokens=4, step_sequences=2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "mean", step_tokens=4, step_sequences=2)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "dr_grpo"])
def test_micro_batch_shares_sum_to_the_whole_step(mode: str) -> None:
    """Gradient accumulation must give the loss of one big batch: the shares add up exactly."""
    torch.manual_seed(0)
    loss = torch.rand(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    step = {"step_tokens": int(mask.sum()), "step_sequences": 4, "dr_grpo_normalizer": 5}
    whole = aggregate_loss(loss, mask, mode, **step)
    shares = aggregate_loss(loss[:1], mask[:1], mode, **step) + aggregate_loss(loss[1:], mask[1:], mode, **step)
    assert shares.item() == pytest.approx(whole.item())
