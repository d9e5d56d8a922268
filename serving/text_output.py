"""The text of one response as its tokens arrive: incremental detokenization and stop strings.

Streaming needs text deltas whose concatenation is exactly the decoded response, never a broken
UTF-8 character (a byte-level token can end mid-character) and never the beginning of a stop string
that might still complete (OpenAI never shows the stop string). Special tokens (end of turn) are
kept in the token ids but produce no text, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` at or after ``start``, or None."""
    hits = [index for stop in stops if (index := text.find(stop, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string: text that
    must be held back because the next token may complete the stop string.
    """
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalDetokenizer:
    """Decodes a growing token list into text deltas, holding back a trailing incomplete character.

    Decodes a small window (from ``prefix_offset``) rather than the whole response each step, and
    diffs it against the window's previous text, so tokenizers that drop a leading space when a
    piece is decoded alone (SentencePiece) still produce the right deltas (the vLLM / TGI scheme).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) > len(prefix) and not window.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return window[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes to U+FFFD, as a full decode would)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return window[len(prefix) :]


class ResponseText:
    """Text of one response: detokenizes each token, stops at the first stop string (excluded from the
    text, as OpenAI does), and holds back any tail that could still grow into a stop string.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = tuple(stops)
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._emitted = 0

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to show now, whether a stop string was reached)."""
        piece = self._detokenizer.push(token_id)
        if not piece:
            return "", False
        # A stop string may begin in the tail held back by earlier steps, not earlier.
        search_from = max(0, len(self._text) - self._longest_stop + 1)
        self._text += piece
        hit = find_stop(self._text, self._stops, search_from) if self._stops else None
        if hit is not None:
            self._text = self._text[:hit]
            return self._take(hit), True
        return self._take(len(self._text) - partial_stop_length(self._text, self._stops)), False

    def finish(self) -> str:
        """The response ended without a stop string: release everything still held back."""
        self._text += self._detokenizer.flush()
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
