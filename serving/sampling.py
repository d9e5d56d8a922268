"""Choosing the next token of one sequence and scoring it: the per-request sampling parameters, greedy
and temperature / nucleus (top-p) sampling, and the logprobs reported back to the client.

Logprobs are the log-softmax of the model's raw logits, before temperature and top-p: the policy's
own probability of the token, which is what a trainer recomputes and compares against (GRPO's
importance ratio), and what vLLM V1 reports by default (``logprobs_mode="raw_logprobs"``). The
sampling distribution itself is the processed one (logits / temperature, then top-p).

Sampling runs on CPU with one ``torch.Generator`` per request, so a seeded request draws the same
tokens whatever else shares its batch and whichever device computed the logits.

Every parameter is checked against what this code can compute (``SamplingParams`` refuses the rest),
so no request can make the sampler raise inside the batch it shares with others: a seed must fit
the generator's 64 bits, and a temperature below ``GREEDY_BELOW_TEMPERATURE`` is greedy (dividing
logits by 1e-300 overflows to inf and NaN probabilities; vLLM draws the same line).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

# Temperatures this close to zero decode greedily: the limit of sampling as T -> 0, and what vLLM does.
GREEDY_BELOW_TEMPERATURE = 1e-5
# ``torch.Generator.manual_seed`` takes any integer in [-2**63, 2**64); seeds are reduced into it.
SEED_MODULUS = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. A ``temperature`` below ``GREEDY_BELOW_TEMPERATURE`` (0 included)
    means greedy (argmax). ``seed`` lies in [0, 2**64) (``seed_for`` maps any integer there).
    ``stop_token_ids`` end the response like the model's end-of-turn token (kept in the token ids, not
    in the text), as in vLLM.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed < SEED_MODULUS:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class TokenChoice:
    """A sampled token, its logprob under the raw model distribution, and the ``k`` most likely tokens."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


def seed_for(seed: int, choice: int = 0) -> int:
    """The generator seed of choice ``choice`` of a request seeded with ``seed`` (any integer): ``seed +
    choice``, wrapped into the generator's 64 bits (negative seeds as two's complement, as torch does).
    """
    return (seed + choice) % SEED_MODULUS


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when the client gave a seed, from the OS otherwise."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (never fewer than one),
    zero the rest and renormalize. ``probs`` is one row, shape ``[vocab]``.
    """
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    kept = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    filtered = torch.zeros_like(probs).scatter(0, order, kept)
    return filtered / filtered.sum()


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row of raw logits (``[vocab]``, float32, CPU)."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = nucleus_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def score_token(logprobs: torch.Tensor, token_id: int, top_k: int) -> TokenChoice:
    """The chosen token's logprob and the ``top_k`` best alternatives, from one row of raw log-softmax."""
    top: tuple[tuple[int, float], ...] = ()
    if top_k > 0:
        values, indices = logprobs.topk(top_k)
        top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenChoice(token_id, float(logprobs[token_id]), top)
