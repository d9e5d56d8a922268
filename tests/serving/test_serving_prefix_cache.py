"""The prefix cache's radix tree: longest exact prefixes, shared prefixes stored once, only new parts
asked for, and least recently used leaves evicted under the byte bound."""

import pytest
import torch

from tracelearn.serving.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 1, 2
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # float32


def key_values(tokens: list[int]) -> torch.Tensor:
    """Fake keys and values that say which token they belong to: every entry of column i is tokens[i]."""
    column = torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1)
    return column.expand(LAYERS, 2, HEADS, -1, DIM).clone()


class Recorder:
    """A ``kv_of`` that records which spans the cache asked for."""

    def __init__(self, tokens: list[int]) -> None:
        self.kv = key_values(tokens)
        self.asked: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.asked.append((start, end))
        return self.kv[:, :, :, start:end]


def stored(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """The tokens the cached keys of ``tokens``' longest prefix belong to."""
    hit = cache.longest_prefix(tokens, len(tokens))
    return [] if hit is None else [int(x) for x in hit.kv[0, 0, 0, :, 0].tolist()]


def test_the_longest_cached_prefix_comes_back_with_its_own_keys_and_values() -> None:
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=2)
    turn_one = [1, 2, 3, 4, 5, 6]
    cache.insert(turn_one, Recorder(turn_one))
    turn_two = [*turn_one, 7, 8]  # the next turn of the conversation
    assert cache.matched_length(turn_two) == 6
    assert stored(cache, turn_two) == turn_one
    hit = cache.longest_prefix(turn_two, most=4)  # a prompt's last token must still run
    assert hit is not None and hit.length == 4 and hit.kv.shape == (LAYERS, 2, HEADS, 4, DIM)
    assert cache.longest_prefix([1, 9, 9], most=3) is None  # one shared token is below min_tokens
    assert cache.longest_prefix([9, 1, 2, 3], most=4) is None


def test_a_shared_prefix_is_stored_once_and_only_new_parts_are_asked_for() -> None:
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=1)
    first, second = [1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]
    cache.insert(first, Recorder(first))
    recorder = Recorder(second)
    cache.insert(second, recorder)
    assert recorder.asked == [(3, 6)]  # the shared [1, 2, 3] was not asked for again
    assert cache.cached_tokens == 3 + 2 + 3  # the split node, then both tails
    assert cache.nbytes == 8 * BYTES_PER_TOKEN
    assert stored(cache, first) == first and stored(cache, second) == second
    again = Recorder(first)
    cache.insert(first, again)
    assert again.asked == [] and cache.cached_tokens == 8
    assert stored(cache, [1, 2, 3, 4, 7]) == [1, 2, 3, 4]  # a match may end inside a node


def test_least_recently_used_leaves_are_evicted_under_the_byte_bound() -> None:
    cache = PrefixCache(max_bytes=10 * BYTES_PER_TOKEN, min_tokens=1)
    old, recent = [1, 2, 3, 4], [1, 2, 5, 6]
    cache.insert(old, Recorder(old))
    cache.insert(recent, Recorder(recent))  # 6 tokens: [1, 2], [3, 4], [5, 6]
    assert cache.longest_prefix(old, 4) is not None  # old is used again: now the recent one
    newcomer = [7, 8, 9, 10, 11]
    cache.insert(newcomer, Recorder(newcomer))  # 11 tokens > 10: the least recently used leaf goes
    assert cache.nbytes <= cache.max_bytes
    assert stored(cache, old) == old and stored(cache, newcomer) == newcomer
    assert stored(cache, recent) == [1, 2]
    assert cache.evicted_tokens == 2
    huge = list(range(100, 130))  # larger than the whole bound: kept nowhere, and nothing breaks
    cache.insert(huge, Recorder(huge))
    assert cache.nbytes <= cache.max_bytes and cache.longest_prefix(huge, 30) is None


def test_a_mismatched_key_value_length_is_refused() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    with pytest.raises(ValueError, match="3 tokens were given 2"):
        cache.insert([1, 2, 3], lambda start, end: key_values([1, 2]))
