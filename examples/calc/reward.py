"""The calc example's reward: 1.0 when the reply's final number is the right result, else 0.0.

The last number is the answer a reader takes away ("4 + 3 = 7" and "7" are right, "7 or 8" is not),
so listing many numbers cannot collect the reward. A binary reward keeps GRPO's advantages
readable: within a task's group, right replies are pushed up and wrong ones down.
"""

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def score(answer: str, gold: str) -> float:
    """1.0 if the last number in ``answer`` equals the gold number (or, for a non-numeric gold, the text matches)."""
    expected = _number(gold.strip())
    if expected is None:
        return 1.0 if answer.strip() == gold.strip() else 0.0
    numbers = _NUMBER.findall(answer.replace(",", ""))
    return 1.0 if numbers and _number(numbers[-1]) == expected else 0.0
