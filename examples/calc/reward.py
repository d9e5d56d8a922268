"""The calc example's reward: exact number match, with partial credit when the number is buried in text.

A small policy (SmolLM2-135M) rarely obeys "the number only"; full credit for the bare number and half
credit when the right number appears anywhere gives GRPO a signal to climb while exact match is rare.
"""

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def score(answer: str, gold: str) -> float:
    """1.0 if ``answer`` is exactly the gold number, 0.5 if the number appears in it, else 0.0."""
    expected = _number(gold.strip())
    if expected is None:
        return 1.0 if answer.strip() == gold.strip() else 0.0
    bare = answer.strip().rstrip(".").strip()
    if _number(bare) == expected:
        return 1.0
    found = (_number(m.group()) for m in _NUMBER.finditer(answer.replace(",", "")))
    return 0.5 if expected in found else 0.0
