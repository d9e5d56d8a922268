"""The ``logprobs`` of a chat response in OpenAI's shape: each token's text, exact bytes and logprob,
and its most likely alternatives.

The values are those of the distribution each token was drawn from (``tracelearn.serving.sampling``,
vLLM's ``processed_logprobs``); a token outside the top-p nucleus has probability 0, and its logprob
is written as ``LOGPROB_FLOOR`` (-9999.0, vLLM's floor), because JSON has no ``-Infinity``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tracelearn.serving.sampling import TokenChoice

LOGPROB_FLOOR = -9999.0


class TokenTexts:
    """The text and exact bytes of single tokens, for logprobs entries.

    Byte-level BPE tokens can hold part of a UTF-8 character, which ``decode`` turns into U+FFFD;
    their bytes are recovered from the byte-to-unicode alphabet instead, so ``bytes`` is exact.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        self._unicode_to_byte = {char: byte for byte, char in _bytes_to_unicode().items()}
        self.entry = lru_cache(maxsize=65536)(self._entry)

    def _entry(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        if self._byte_level and token_id not in self._special:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if all(char in self._unicode_to_byte for char in piece):
                raw = bytes(self._unicode_to_byte[char] for char in piece)
                return raw.decode("utf-8", errors="replace"), tuple(raw)
        text = str(self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return text, tuple(text.encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte-to-printable-character alphabet, used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def logprobs_body(tokens: Sequence[TokenChoice], texts: TokenTexts) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = texts.entry(token_id)
        # max() keeps NaN; a NaN logprob cannot come from the sampler (it refuses such parameters)
        return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(raw)}

    return {
        "content": [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]} for t in tokens
        ]
    }
