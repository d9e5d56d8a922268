"""Write the calc example's task files: arithmetic split into training, validation and held-out tasks.

The tasks are one-digit additions, subtractions (never negative) and small multiplications, phrased
"What is 3 plus 4?". The default policy, SmolLM2-135M-Instruct, states the right result in about a
third of its replies at temperature 0.7 (it rambles, or gets the sum wrong): a task it solves
sometimes, which is what GRPO needs to learn from (a task it never solves gives no signal). Every
(a, operation, b) triple lands in exactly one file, so the held-out score measures generalization,
not memorized answers. Seeded: running it again writes the same files.

    python examples/calc/make_tasks.py            # tasks.jsonl (64), tasks_val.jsonl (24), tasks_heldout.jsonl (48)

A second family, the tool task, is products of two two-digit numbers ("What is 47 times 86?"), which
SmolLM2-135M-Instruct cannot work out in its head (0 of 40 right) but can through the calculator tool:
success there is decided by whether the agent calls the tool, which is what RL has to learn.

    python examples/calc/make_tasks.py            # also products.jsonl (64), products_heldout.jsonl (48)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = (("tasks.jsonl", "calc", 64), ("tasks_val.jsonl", "val", 24), ("tasks_heldout.jsonl", "held", 48))
PRODUCT_SPLITS = (("products.jsonl", "mul", 64), ("products_heldout.jsonl", "mul-held", 48))
# The agent's worked examples (agent.py WORKED_EXAMPLES) are left out of the product tasks.
EXAMPLE_PRODUCTS = frozenset({(12, 34), (57, 26), (83, 41)})


def all_problems() -> list[tuple[str, str]]:
    """Every (question, answer) of the family, in a fixed order."""
    problems = []
    for a in range(1, 10):
        for b in range(1, 10):
            problems.append((f"What is {a} plus {b}?", str(a + b)))
            if a >= b:
                problems.append((f"What is {a} minus {b}?", str(a - b)))
            if a <= 5 and b <= 5 and min(a, b) >= 2:
                problems.append((f"What is {a} times {b}?", str(a * b)))
    return problems


def all_products() -> list[tuple[str, str]]:
    """Every product of two two-digit numbers (a <= b, neither a multiple of 10), in a fixed order."""
    return [(f"What is {a} times {b}?", str(a * b)) for a in range(11, 100) for b in range(a, 100)
            if a % 10 and b % 10 and (a, b) not in EXAMPLE_PRODUCTS and (b, a) not in EXAMPLE_PRODUCTS]


def split_problems(seed: int, problems: list[tuple[str, str]] | None = None,
                   splits_spec: tuple[tuple[str, str, int], ...] = SPLITS) -> dict[str, list[dict[str, str]]]:
    """Shuffle a family once (default: the small arithmetic) and cut it into disjoint task lists, one per file."""
    problems = list(all_problems() if problems is None else problems)
    random.Random(seed).shuffle(problems)
    splits, start = {}, 0
    for file_name, prefix, count in splits_spec:
        chosen = problems[start : start + count]
        start += count
        splits[file_name] = [
            {"id": f"{prefix}-{number:03d}", "question": question, "answer": answer}
            for number, (question, answer) in enumerate(chosen, 1)
        ]
    return splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    families = {**split_problems(args.seed), **split_problems(args.seed, all_products(), PRODUCT_SPLITS)}
    for file_name, tasks in families.items():
        path = args.out / file_name
        path.write_text("".join(json.dumps(task) + "\n" for task in tasks), encoding="utf-8")
        print(f"wrote {len(tasks)} tasks to {path}")


if __name__ == "__main__":
    main()
