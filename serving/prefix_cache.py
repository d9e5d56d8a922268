"""Key/value caches of token sequences the engine has already run, so a prompt that starts with one
prefills only what follows it: a radix tree over token ids (SGLang's RadixAttention), bounded in bytes.

What it saves: an agent's next prompt is its previous prompt, the reply and the tool result, so a
conversation's turn k+1 shares turn k's whole prompt and most of its reply; the samples of a GRPO
group share their prompt; every task of an agent shares the system prompt and tool declarations.
The engine inserts each prompt once it is prefilled and each finished sequence (prompt and reply),
and asks for the longest cached prefix of every new prompt.

Each node holds a run of tokens and their keys and values for every layer in one tensor
``[layers, 2, heads, tokens, head_dim]``; a node's tokens continue its parent's, so shared prefixes
are stored once. Matching is exact on token ids, and keys are cached after the rotary embedding at
the positions they were computed at, which a reused prefix keeps, so reusing a prefix changes
nothing but the rounding of the attention sums (see the engine's tests). When the stored bytes
exceed ``max_bytes`` the least recently used leaves go first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# How a caller hands over the keys and values of tokens[start:end] (``[layers, 2, heads, end - start,
# head_dim]``): asked only for the part of a sequence that the tree does not hold yet.
KeyValuesOf = Callable[[int, int], torch.Tensor]


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, heads, len(tokens), head_dim]
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class PrefixHit:
    """The cached keys and values of a prompt's first ``length`` tokens: ``[layers, 2, heads, length, head_dim]``."""

    length: int
    kv: torch.Tensor


def _shared_length(segment: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    """How many of ``segment``'s tokens ``tokens[start:]`` begins with."""
    if tuple(tokens[start : start + len(segment)]) == segment:
        return len(segment)
    length = 0
    for mine, theirs in zip(segment, tokens[start:], strict=False):
        if mine != theirs:
            break
        length += 1
    return length


class PrefixCache:
    """Token sequences and their key/value caches, in a radix tree of at most ``max_bytes``.

    Not thread-safe: the engine's worker thread is its only user. ``min_tokens``: shorter matches are
    not worth reusing (a chat template's first few tokens are common to every prompt).
    """

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._root = _Node((), torch.empty(0), None)
        self._clock = 0
        self._nodes: set[_Node] = set()
        self.nbytes = 0
        self.evicted_tokens = 0

    @property
    def cached_tokens(self) -> int:
        return sum(len(node.tokens) for node in self._nodes)

    def _path(self, tokens: Sequence[int]) -> list[tuple[_Node, int]]:
        """The nodes ``tokens`` runs through from the root, each with how many of its tokens match."""
        path: list[tuple[_Node, int]] = []
        node, position = self._root, 0
        while position < len(tokens):
            child = node.children.get(tokens[position])
            if child is None:
                break
            shared = _shared_length(child.tokens, tokens, position)
            path.append((child, shared))
            position += shared
            if shared < len(child.tokens):
                break
            node = child
        return path

    def matched_length(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` the cache holds."""
        return sum(shared for _, shared in self._path(tokens))

    def longest_prefix(self, tokens: Sequence[int], most: int) -> PrefixHit | None:
        """The keys and values of the longest cached prefix of ``tokens``, at most ``most`` tokens long
        (a prompt's last token must still run, to give the logits of the next), or None when that is
        shorter than ``min_tokens``. The nodes used count as recently used."""
        parts: list[torch.Tensor] = []
        length = 0
        self._clock += 1
        for node, shared in self._path(tokens):
            take = min(shared, most - length)
            if take <= 0:
                break
            node.last_used = self._clock
            parts.append(node.kv if take == len(node.tokens) else node.kv[:, :, :, :take])
            length += take
        if length < self.min_tokens:
            return None
        return PrefixHit(length, parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))

    def insert(self, tokens: Sequence[int], kv_of: KeyValuesOf) -> None:
        """Remember ``tokens`` with their keys and values; ``kv_of(start, end)`` is asked only for the
        part the tree does not hold yet. Then evict down to ``max_bytes``."""
        self._clock += 1
        node, position = self._root, 0
        while position < len(tokens):
            child = node.children.get(tokens[position])
            if child is None:
                self._add_leaf(node, tuple(tokens[position:]), kv_of(position, len(tokens)))
                break
            shared = _shared_length(child.tokens, tokens, position)
            if shared < len(child.tokens):
                child = self._split(child, shared)
            child.last_used = self._clock
            node, position = child, position + shared
        self._evict()

    def _add_leaf(self, parent: _Node, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        if kv.shape[3] != len(tokens):
            raise ValueError(f"{len(tokens)} tokens were given {kv.shape[3]} key/value columns")
        # Our own copy: ``kv`` is often a view into a whole batch's cache, which must not stay alive.
        leaf = _Node(tokens, kv.clone(), parent, last_used=self._clock)
        parent.children[tokens[0]] = leaf
        self._nodes.add(leaf)
        self.nbytes += leaf.nbytes

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node`` after its first ``at`` tokens; return the new upper part (the lower keeps the children)."""
        assert node.parent is not None and 0 < at < len(node.tokens)
        upper = _Node(node.tokens[:at], node.kv[:, :, :, :at].clone(), node.parent, last_used=node.last_used)
        node.parent.children[upper.tokens[0]] = upper
        self.nbytes -= node.nbytes
        node.tokens, node.kv, node.parent = node.tokens[at:], node.kv[:, :, :, at:].clone(), upper
        upper.children[node.tokens[0]] = node
        self._nodes.add(upper)
        self.nbytes += upper.nbytes + node.nbytes
        return upper

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            leaf = min((n for n in self._nodes if not n.children), key=lambda n: n.last_used)
            assert leaf.parent is not None
            del leaf.parent.children[leaf.tokens[0]]
            self._nodes.discard(leaf)
            self.nbytes -= leaf.nbytes
            self.evicted_tokens += len(leaf.tokens)
