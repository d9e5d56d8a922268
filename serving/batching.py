"""Tensor bookkeeping of a batch of sequences decoded together: left padding, and the key/value cache
that rows join and leave between decoding steps (continuous batching), starts from cached prefixes
(``tracelearn.serving.prefix_cache``) and hands rows back to that cache.

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

from tracelearn.serving.prefix_cache import KeyValuesOf

# One layer's keys and values, each ``[batch, heads, columns, head_dim]``.
LayerKeyValues = tuple[torch.Tensor, torch.Tensor]


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

    @classmethod
    def starting_from(cls, prefixes: Sequence[torch.Tensor | None], suffix_mask: torch.Tensor) -> PaddedCache:
        """The cache of a batch about to prefill its suffixes (``suffix_mask``: ``[rows, suffix columns]``),
        row i starting from cached prefix i (``[layers, 2, heads, tokens, head_dim]``, or None).

        Prefixes are right-aligned in the first columns and the suffixes left-padded after them, so
        padding may sit between a row's prefix and its suffix: the mask hides it, and positions count
        real tokens only. The mask covers the prefix columns and the suffix's.
        """
        lengths = [0 if prefix is None else int(prefix.shape[3]) for prefix in prefixes]
        columns = max(lengths)
        prefix_mask = suffix_mask.new_zeros((len(prefixes), columns))
        for row, length in enumerate(lengths):
            prefix_mask[row, columns - length :] = 1
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        if columns == 0:
            return cls(DynamicCache(), mask)
        template = next(prefix for prefix in prefixes if prefix is not None)
        layers, _, heads, _, head_dim = template.shape
        stacked = template.new_zeros((layers, 2, len(prefixes), heads, columns, head_dim))
        for row, prefix in enumerate(prefixes):
            if prefix is not None:
                stacked[:, :, row, :, columns - lengths[row] :] = prefix
        return cls(DynamicCache(ddp_cache_data=[(stacked[i, 0], stacked[i, 1]) for i in range(layers)]), mask)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def layer_tensors(self) -> list[LayerKeyValues]:
        """The cache's tensors as they are now. The model's forward pass replaces them rather than
        writing into them (``DynamicLayer.update`` concatenates), so this is a snapshot to go back to."""
        return [(k, v) for k, v, *_ in self.cache]

    @classmethod
    def from_tensors(cls, layers: Sequence[LayerKeyValues], mask: torch.Tensor) -> PaddedCache:
        return cls(DynamicCache(ddp_cache_data=layers) if layers else DynamicCache(), mask)

    def key_values_of_row(self, row: int) -> KeyValuesOf:
        """The keys and values of ``row``'s real tokens ``[start:end]`` (in order, padding skipped) as
        ``[layers, 2, heads, end - start, head_dim]``, for the prefix cache."""
        columns = self.mask[row].nonzero().squeeze(1)
        layers = [(k[row], v[row]) for k, v in self.layer_tensors()]

        def key_values(start: int, end: int) -> torch.Tensor:
            index = columns[start:end]
            return torch.stack([torch.stack([k.index_select(1, index), v.index_select(1, index)]) for k, v in layers])

        return key_values

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
