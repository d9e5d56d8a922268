"""Choosing the next token of one sequence and scoring it: the per-request sampling parameters, greedy
and temperature / nucleus (top-p) sampling, and the logprobs reported back to the client.

Logprobs are those of the distribution the token was drawn from: the log-softmax of the logits
divided by the temperature, restricted to the top-p nucleus and renormalized over it (a token outside
it has probability 0; the API floors its logprob at -9999.0, as vLLM does). That is vLLM's
``--logprobs-mode processed_logprobs`` (``tracelearn serve --engine vllm`` passes it), and the
behaviour policy's probability, which an importance ratio needs: a trainer that recomputes
``log_softmax(logits / temperature)`` with the recorded temperature gets the same value at the first
step, and with top-p the ratio also carries the nucleus renormalization. Greedy decoding (a
temperature below ``GREEDY_BELOW_TEMPERATURE``) reports the unscaled ``log_softmax(logits)``, as vLLM
does. At temperature 1 without top-p, this is the model's raw distribution (vLLM's default
``raw_logprobs``).

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
# What the logprobs report, in vLLM's words (``--logprobs-mode``).
LOGPROBS_MODE = "processed_logprobs"


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
    """A sampled token, its logprob under the distribution it was drawn from, and the ``k`` most likely tokens."""

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


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution a token is drawn from, for one row of raw logits (``[vocab]``):
    ``log_softmax(logits / temperature)`` over the top-p nucleus, renormalized, ``-inf`` outside it;
    ``log_softmax(logits)`` when greedy."""
    if params.greedy:
        return torch.log_softmax(logits, dim=-1)
    logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
    if params.top_p >= 1:
        return logprobs
    kept = nucleus_filter(logprobs.exp(), params.top_p) > 0
    nucleus_mass = torch.logsumexp(logprobs[kept], dim=0)
    return torch.where(kept, logprobs - nucleus_mass, torch.full_like(logprobs, float("-inf")))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> TokenChoice:
    """Pick the next token from one row of raw logits (``[vocab]``, float32, CPU) and score it under the
    distribution it was drawn from (``sampling_logprobs``)."""
    logprobs = sampling_logprobs(logits, params)
    drawn = logits.argmax() if params.greedy else torch.multinomial(logprobs.exp(), 1, generator=generator)
    return score_token(logprobs, int(drawn), params.top_logprobs)


def score_token(logprobs: torch.Tensor, token_id: int, top_k: int) -> TokenChoice:
    """The chosen token's logprob and the ``top_k`` best alternatives, from one row of log-probabilities."""
    top: tuple[tuple[int, float], ...] = ()
    if top_k > 0:
        values, indices = logprobs.topk(top_k)
        top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenChoice(token_id, float(logprobs[token_id]), top)
