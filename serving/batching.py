"""Tensor bookkeeping of a batch of sequences decoded together: left padding, and the key/value cache
that rows join and leave between decoding steps (continuous batching).

Rows are left-padded so every row's newest token sits in the last column and one forward pass of
shape ``[batch, 1]`` advances all of them. A row's position ids count only its real tokens, so
padding never shifts its rotary positions; the attention mask hides padded columns. Keys are cached
after the rotary embedding, so padding a cache on the left (to merge batches of different lengths)
or cutting columns that every row ignores changes nothing a row attends to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` (each ``[batch, longest]``) of a
    left-padded batch. Padded columns get position 0; they are masked anyway.
    """
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, longest - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, longest - len(tokens) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def _pad_columns_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@dataclass
class PaddedCache:
    """The key/value cache of a left-padded batch and its ``[batch, columns]`` attention mask.

    Built on transformers' ``DynamicCache`` (one ``[batch, heads, columns, head_dim]`` key and value
    tensor per layer), which the model extends in place on each forward pass.
    """

    cache: DynamicCache
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def extend_mask(self) -> torch.Tensor:
        """Mask for a forward pass that appends one real token to every row; kept as the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask

    def concat(self, other: PaddedCache) -> PaddedCache:
        """Stack ``other``'s rows under this batch's, left-padding the shorter cache."""
        columns = max(self.mask.shape[1], other.mask.shape[1])
        mine, theirs = columns - self.mask.shape[1], columns - other.mask.shape[1]
        layers = [
            (
                torch.cat([_pad_columns_left(k1, mine, 2), _pad_columns_left(k2, theirs, 2)], dim=0),
                torch.cat([_pad_columns_left(v1, mine, 2), _pad_columns_left(v2, theirs, 2)], dim=0),
            )
            for (k1, v1, *_), (k2, v2, *_) in zip(self.cache, other.cache, strict=True)
        ]
        mask = torch.cat([_pad_columns_left(self.mask, mine, 1), _pad_columns_left(other.mask, theirs, 1)], dim=0)
        return PaddedCache(DynamicCache(ddp_cache_data=layers), mask)

    def select(self, rows: Sequence[int]) -> PaddedCache:
        """Keep only ``rows`` (finished sequences leave) and drop leading columns no kept row attends to."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])
        layers = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v, *_ in self.cache
        ]
        return PaddedCache(DynamicCache(ddp_cache_data=layers), mask[:, first:])


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens ``first`` and ``second`` share."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


@dataclass(frozen=True)
class CachedPrefix:
    """The key/value cache of a prompt prefix, computed once for a batch of one: ``[1, heads, tokens, dim]``."""

    token_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def expanded(self, rows: int, suffix_mask: torch.Tensor) -> PaddedCache:
        """A padded cache of ``rows`` rows that all start with this prefix, ready for their suffixes.

        The prefix occupies the first columns of every row and the suffixes are left-padded after it,
        so padding sits between the two: the mask hides it and positions count real tokens only.
        """
        layers = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers]
        prefix_mask = suffix_mask.new_ones((rows, len(self.token_ids)))
        return PaddedCache(DynamicCache(ddp_cache_data=layers), torch.cat([prefix_mask, suffix_mask], dim=1))


class PrefixCache:
    """Prompt prefixes many requests share (an agent's system prompt and tool declarations), whose key/value
    caches are computed once and reused, so a request's prefill runs only on what follows the prefix.

    A prefix is found by comparing a prompt with recently seen ones: the tokens it shares with the most
    similar of them, if at least ``min_tokens``, are worth caching. At most ``capacity`` prefixes are
    kept, least recently used dropped first. Matching is exact on token ids, and a prefix is used only
    for a prompt longer than it (the prompt's last token must run, to give the next token's logits).
    """

    def __init__(self, capacity: int = 8, min_tokens: int = 32, recent: int = 32) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self._prefixes: dict[tuple[int, ...], CachedPrefix] = {}
        self._recent: list[tuple[int, ...]] = []
        self._recent_limit = recent

    def __len__(self) -> int:
        return len(self._prefixes)

    def lookup(self, prompt: Sequence[int]) -> CachedPrefix | None:
        """The longest cached prefix ``prompt`` starts with (and is longer than), marked recently used."""
        best: CachedPrefix | None = None
        for key, cached in self._prefixes.items():
            if len(key) < len(prompt) and (best is None or len(key) > len(best.token_ids)) \
                    and tuple(prompt[: len(key)]) == key:
                best = cached
        if best is not None:
            self._prefixes[best.token_ids] = self._prefixes.pop(best.token_ids)
        return best

    def candidate(self, prompt: Sequence[int]) -> tuple[int, ...] | None:
        """A prefix worth caching for ``prompt``: what it shares with the most similar recent prompt
        (capped one token short of it), or None; ``prompt`` is remembered as recent either way."""
        shared = max((common_prefix_length(prompt, seen) for seen in self._recent), default=0)
        shared = min(shared, len(prompt) - 1)
        self._recent = [*self._recent[-(self._recent_limit - 1):], tuple(prompt)]
        return tuple(prompt[:shared]) if shared >= self.min_tokens else None

    def store(self, prefix: CachedPrefix) -> None:
        self._prefixes[prefix.token_ids] = prefix
        while len(self._prefixes) > self.capacity:
            self._prefixes.pop(next(iter(self._prefixes)))
