"""Streaming text: deltas that add up to the decoded response, stop strings, held-back tails."""

from typing import Any

import pytest

from tracelearn.serving.text_output import IncrementalDetokenizer, ResponseText, find_stop, partial_stop_length

MIXED_TEXT = "Grüße aus Köln — naïve café 🙂 日本語のテキスト, and 3 + 4 = 7."


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Any) -> Any:
    return tiny_model.tokenizer


def test_find_stop_and_partial_stop_length() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("hello hello", ["hello"], start=1) == 6
    assert partial_stop_length("the answer is: ", ["is: done"]) == 4
    assert partial_stop_length("abc", ["cde", "bcx"]) == 2
    assert partial_stop_length("abc", ["abc"]) == 0  # a whole stop string is a hit, not a partial one
    assert partial_stop_length("abc", []) == 0


def test_incremental_deltas_add_up_to_the_full_decode(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    assert "".join(deltas) + detokenizer.flush() == MIXED_TEXT
    assert not any("\ufffd" in d for d in deltas), "a delta split a UTF-8 character"


def test_a_response_cut_mid_character_ends_like_a_full_decode(tokenizer: Any) -> None:
    ids = tokenizer.encode("emoji 🙂", add_special_tokens=False)[:-1]  # drop the emoji's last byte token
    response = ResponseText(tokenizer, [])
    text = "".join(response.push(i)[0] for i in ids) + response.finish()
    assert text == tokenizer.decode(ids) == response.text


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tokenizer: Any) -> None:
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    response = ResponseText(tokenizer, ["naïve c", "unused"])
    shown, stopped_at = "", None
    for index, token in enumerate(ids):
        delta, stopped = response.push(token)
        shown += delta
        assert "naïve c" not in shown
        if stopped:
            stopped_at = index
            break
    assert stopped_at is not None
    assert shown == response.text == MIXED_TEXT[: MIXED_TEXT.index("naïve c")]


def test_held_back_tail_is_released_when_the_stop_string_does_not_complete(tokenizer: Any) -> None:
    response = ResponseText(tokenizer, ["Köln!"])
    ids = tokenizer.encode("Grüße aus Köln", add_special_tokens=False)
    shown = "".join(response.push(i)[0] for i in ids)
    assert not shown.endswith("Köln")  # could still become the stop string
    assert shown + response.finish() == "Grüße aus Köln"
