"""Transitions -> token sequences the trainers consume, and micro-batches under a token budget.

A :class:`TokenSequence` is one transition as the policy saw it: the prompt token ids and the response
token ids exactly as the server recorded them (token fidelity), the response logprobs at capture
time, the per-token loss mask, the advantage and the reward, and how it was sampled (temperature,
top-p, top-k, the model version that generated it). Transitions without server token ids
are retokenized with the training tokenizer's chat template (the prompt messages, then the response
text and the end-of-turn token) and counted in :class:`SequenceCounts`, never silently: a
retokenized prompt may differ from what the model saw (the transitions table holds no tool
definitions, so a server that declared tools in the system prompt rendered a longer prompt).

Batching: :func:`mini_batches` shuffles the sequences (seeded) into optimizer steps of
``mini_batch_size`` sequences; :func:`micro_batches` sorts one step's sequences by length and cuts
them into forward passes whose padded size (``rows x longest``) stays under ``micro_batch_tokens``,
so short sequences are not padded to the longest one of the step.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

__all__ = [
    "SequenceCounts",
    "TokenSequence",
    "micro_batches",
    "mini_batches",
    "padding_fraction",
    "sequences_from_transitions",
]

_COLUMNS = (
    "rollout_id",
    "task_id",
    "span_id",
    "prompt_messages",
    "response",
    "prompt_token_ids",
    "response_token_ids",
    "response_logprobs",
    "loss_mask",
    "advantage",
    "reward",
    "temperature",
    "top_p",
    "top_k",
    "model_version",
)


@dataclass
class TokenSequence:
    """One transition as token ids; ``old_logprobs`` is None until recorded or recomputed."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    advantage: float
    reward: float | None
    old_logprobs: list[float] | None
    retokenized: bool
    rollout_id: str
    task_id: str | None
    span_id: str | None
    ref_logprobs: list[float] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    model_version: str | None = None
    # Off-policy rows weighed by importance: the logprobs the generating version recorded (``old_logprobs``
    # then holds the starting weights') and the per-token truncated importance weights computed from both.
    behaviour_logprobs: list[float] | None = None
    importance_weights: list[float] | None = None

    @property
    def sampling_temperature(self) -> float:
        """The temperature the logits are divided by: the recorded one; 1 when unknown, or 0 (greedy: servers
        report greedy calls' logprobs unscaled, as vLLM does)."""
        return self.temperature if self.temperature is not None and self.temperature > 0 else 1.0

    @property
    def truncated(self) -> bool:
        """Whether the call was sampled from a truncated distribution (``top_p`` < 1 or ``top_k`` > 0)."""
        return (self.top_p is not None and self.top_p < 1.0) or (self.top_k is not None and self.top_k > 0)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class SequenceCounts:
    """What became of the transitions: kept, retokenized, and dropped by reason."""

    transitions: int = 0
    kept: int = 0
    retokenized: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def to_dict(self) -> dict[str, Any]:
        return {"transitions": self.transitions, "kept": self.kept, "retokenized": self.retokenized,
                "dropped": dict(sorted(self.dropped.items()))}


def _messages(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    decoded = json.loads(text)
    return decoded if isinstance(decoded, list) else [decoded]


def _response_text(messages: list[dict[str, Any]]) -> str:
    """The assistant text of a response, tool calls written the way chat templates render them."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(part.get("text", "")) for part in content if isinstance(part, dict))
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments")
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
            parts.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(part for part in parts if part)


def _retokenize(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """Prompt and response ids rendered by ``tokenizer``'s chat template; None when the messages are unusable."""
    try:
        prompt_messages = _messages(row["prompt_messages"])
        response_messages = _messages(row["response"])
    except json.JSONDecodeError:
        return None
    if not prompt_messages or not response_messages:
        return None
    conversation = [
        {"role": str(m.get("role", "user")), "content": _response_text([m]) if m.get("role") == "assistant"
         else (m.get("content") if isinstance(m.get("content"), str) else _response_text([m]))}
        for m in prompt_messages
    ]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    response = list(tokenizer.encode(_response_text(response_messages), add_special_tokens=False))
    if tokenizer.eos_token_id is not None:
        response.append(int(tokenizer.eos_token_id))
    return [int(i) for i in prompt], [int(i) for i in response]


def sequences_from_transitions(
    transitions: pl.DataFrame,
    tokenizer: Any | None,
    *,
    require_advantage: bool = True,
    max_sequence_tokens: int | None = None,
) -> tuple[list[TokenSequence], SequenceCounts]:
    """Token sequences of ``transitions`` (a TRANSITIONS frame), in row order.

    Rows keep their server token ids and logprobs; rows without ids are retokenized with
    ``tokenizer`` (None: dropped as ``without_token_ids``). Dropped and counted: rows without an
    advantage (when ``require_advantage``; otherwise it counts as 0), whose messages cannot be
    retokenized, with an empty prompt or response, whose loss mask does not match the response
    length, or longer than ``max_sequence_tokens``. Logprobs of the wrong length are counted and
    recomputed, the row kept.
    """
    counts = SequenceCounts(transitions=transitions.height)
    sequences: list[TokenSequence] = []
    for row in transitions.select(_COLUMNS).iter_rows(named=True):
        if row["advantage"] is None and require_advantage:
            counts.drop("without_advantage")
            continue
        retokenized = row["prompt_token_ids"] is None or row["response_token_ids"] is None
        if retokenized:
            rendered = _retokenize(row, tokenizer) if tokenizer is not None else None
            if rendered is None:
                counts.drop("without_token_ids" if tokenizer is None else "unusable_messages")
                continue
            prompt_ids, response_ids = rendered
            logprobs = None
        else:
            prompt_ids, response_ids = list(row["prompt_token_ids"]), list(row["response_token_ids"])
            logprobs = row["response_logprobs"]
            if logprobs is not None and len(logprobs) != len(response_ids):
                counts.drop("logprobs_length_mismatch_recomputed")
                logprobs = None
        if not response_ids or not prompt_ids:
            counts.drop("empty_prompt_or_response")
            continue
        mask = [int(m) for m in row["loss_mask"]] if row["loss_mask"] is not None else [1] * len(response_ids)
        if len(mask) != len(response_ids):
            counts.drop("loss_mask_length_mismatch")
            continue
        if max_sequence_tokens is not None and len(prompt_ids) + len(response_ids) > max_sequence_tokens:
            counts.drop("longer_than_max_sequence_tokens")
            continue
        counts.retokenized += int(retokenized)
        sequences.append(
            TokenSequence(
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                loss_mask=mask,
                advantage=float(row["advantage"] or 0.0),
                reward=row["reward"],
                old_logprobs=[float(v) for v in logprobs] if logprobs is not None else None,
                retokenized=retokenized,
                rollout_id=row["rollout_id"],
                task_id=row["task_id"],
                span_id=row["span_id"],
                temperature=row["temperature"],
                top_p=row["top_p"],
                top_k=row["top_k"],
                model_version=row["model_version"],
            )
        )
    counts.kept = len(sequences)
    return sequences, counts


def mini_batches(sequences: Sequence[TokenSequence], size: int, seed: int) -> list[list[TokenSequence]]:
    """``sequences`` shuffled with ``seed`` and cut into optimizer steps of ``size`` (the last may be smaller)."""
    order = list(sequences)
    random.Random(seed).shuffle(order)
    return [order[start : start + size] for start in range(0, len(order), size)]


def micro_batches(step: Sequence[TokenSequence], token_budget: int,
                  shared_prefix: int = 0) -> Iterator[list[TokenSequence]]:
    """One step's sequences, longest first, in forward passes of at most ``token_budget`` computed tokens.

    A pass computes ``shared_prefix`` tokens once and ``rows x (longest - shared_prefix)`` after them
    (``shared_prefix`` 0: every row in full). A sequence longer than the budget gets a pass of its own.
    """
    batch: list[TokenSequence] = []
    longest = 0
    for sequence in sorted(step, key=lambda s: s.length, reverse=True):
        candidate = max(longest, sequence.length)
        if batch and shared_prefix + (candidate - shared_prefix) * (len(batch) + 1) > token_budget:
            yield batch
            batch, candidate = [], sequence.length
        batch.append(sequence)
        longest = candidate
    if batch:
        yield batch


def padding_fraction(batches: Sequence[Sequence[TokenSequence]]) -> float:
    """Share of the padded tokens of ``batches`` that are padding."""
    padded = sum(len(b) * max(s.length for s in b) for b in batches if b)
    real = sum(s.length for b in batches for s in b)
    return 0.0 if padded == 0 else 1.0 - real / padded
