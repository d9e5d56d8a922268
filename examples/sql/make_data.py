"""Write the sql example's data: the shop database's rows (data.sql) and its task files.

The shop is four small tables (``schema.sql``): 15 customers in 5 cities, 12 products in 4
categories, 30 orders and their items. The rows come from a seeded generator, so running this again
writes the same ``data.sql``. The tasks are questions from a few families (counts, filters, averages,
sorting, DISTINCT, two-table joins), each with its gold query; every question lands in exactly one
file, and every gold query is run on the database here and must return a non-empty result without
NULLs.

    python examples/sql/make_data.py     # data.sql, tasks.jsonl (50), tasks_heldout.jsonl (25)
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from reward import SCHEMA_PATH, build_database, run_select

HERE = Path(__file__).resolve().parent
SPLITS = (("tasks.jsonl", "sql-train", 50), ("tasks_heldout.jsonl", "sql-held", 25))
# Customers per city, uneven so that counting the wrong city's customers gives a wrong count.
CITY_SIZES = {"Berlin": 5, "Lisbon": 2, "Madrid": 4, "Paris": 3, "Rome": 1}
CITIES = tuple(CITY_SIZES)
FIRST_NAMES = (
    "Alice", "Bruno", "Carla", "David", "Elena", "Farid", "Greta", "Hugo",
    "Irene", "Jonas", "Karin", "Luis", "Marta", "Nina", "Omar",
)  # fmt: skip
LAST_NAMES = ("Weber", "Costa", "Ruiz", "Martin", "Rossi", "Silva", "Meyer", "Bernard", "Lopez", "Dubois")
PRODUCTS = (  # uneven categories, for the same reason
    ("Chess Set", "games", 24.5), ("Puzzle Box", "games", 12.0), ("Card Deck", "games", 4.5),
    ("Dice Set", "games", 6.0), ("Jigsaw Puzzle", "games", 16.0),
    ("Frying Pan", "kitchen", 29.99), ("Tea Kettle", "kitchen", 22.0), ("Salad Bowl", "kitchen", 9.5),
    ("Bread Knife", "kitchen", 13.0),
    ("Garden Hose", "garden", 18.0), ("Flower Seeds", "garden", 3.25),
    ("Atlas", "books", 35.0),
)  # fmt: skip
STATUSES = (("shipped", 0.6), ("pending", 0.25), ("cancelled", 0.15))
MONTHS = ("January", "February", "March", "April", "May", "June")
N_ORDERS = 30


def _quoted(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def data_rows(seed: int) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows, from ``seed``."""
    rng = random.Random(seed)
    cities = [city for city, size in CITY_SIZES.items() for _ in range(size)]
    rng.shuffle(cities)
    people = zip(FIRST_NAMES, cities, strict=True)
    customers = [(i, f"{first} {rng.choice(LAST_NAMES)}", city) for i, (first, city) in enumerate(people, 1)]
    products = [(i, name, category, price) for i, (name, category, price) in enumerate(PRODUCTS, 1)]
    orders, items = [], []
    for order_id in range(1, N_ORDERS + 1):
        status = rng.choices([s for s, _ in STATUSES], weights=[w for _, w in STATUSES])[0]
        date = f"2024-{rng.randint(1, len(MONTHS)):02d}-{rng.randint(1, 28):02d}"
        orders.append((order_id, rng.randint(1, len(customers)), date, status))
        for product_id in sorted(rng.sample(range(1, len(products) + 1), rng.randint(1, 3))):
            items.append((order_id, product_id, rng.randint(1, 4)))
    return {"customers": customers, "products": products, "orders": orders, "order_items": items}


def data_sql(seed: int) -> str:
    lines = [f"-- The shop's rows, written by make_data.py (seed {seed}); run it again instead of editing."]
    for table, rows in data_rows(seed).items():
        lines.extend(f"INSERT INTO {table} VALUES ({', '.join(map(_quoted, row))});" for row in rows)
    return "\n".join(lines) + "\n"


_JOIN_ORDERS = "FROM orders JOIN customers ON customers.id = orders.customer_id"
_JOIN_ITEMS = "FROM order_items JOIN products ON products.id = order_items.product_id"


def _names(database: Path, query: str) -> list[str]:
    connection = sqlite3.connect(database)
    try:
        return [name for (name,) in connection.execute(query)]
    finally:
        connection.close()


def all_questions(database: Path) -> list[tuple[str, str]]:
    """Every (question, gold query) of the families, in a fixed order."""
    buyers = _names(database, "SELECT name FROM customers WHERE id IN (SELECT customer_id FROM orders) ORDER BY id")
    bought = _names(database, "SELECT name FROM products WHERE id IN (SELECT product_id FROM order_items) ORDER BY id")
    categories = sorted({category for _, category, _ in PRODUCTS})
    months = [(month, f"{number:02d}") for number, month in enumerate(MONTHS, 1)]
    # (question, gold query, the values of {0} and {1} each takes); no values: the question as it is.
    families: list[tuple[str, str, list[Any]]] = [
        ("How many customers are there?", "SELECT COUNT(*) FROM customers", []),
        ("How many products are there?", "SELECT COUNT(*) FROM products", []),
        ("How many orders are there?", "SELECT COUNT(*) FROM orders", []),
        ("Which cities do customers live in? List each city once.", "SELECT DISTINCT city FROM customers", []),
        ("What is the name of the most expensive product?", "SELECT name FROM products ORDER BY price DESC LIMIT 1",
         []),
        ("What is the name of the cheapest product?", "SELECT name FROM products ORDER BY price ASC LIMIT 1", []),
        ("List the names of customers who have a pending order, each once.",
         f"SELECT DISTINCT customers.name {_JOIN_ORDERS} WHERE orders.status = 'pending'", []),
        ("How many customers live in {0}?", "SELECT COUNT(*) FROM customers WHERE city = '{0}'", list(CITIES)),
        ("List the names of customers who live in {0}.", "SELECT name FROM customers WHERE city = '{0}'", list(CITIES)),
        ("List the names of customers who live in {0}, in alphabetical order.",
         "SELECT name FROM customers WHERE city = '{0}' ORDER BY name", list(CITIES[:3])),
        ("How many products are in the {0} category?", "SELECT COUNT(*) FROM products WHERE category = '{0}'",
         categories),
        ("List the names of products in the {0} category.", "SELECT name FROM products WHERE category = '{0}'",
         categories),
        ("What is the average price of products in the {0} category?",
         "SELECT AVG(price) FROM products WHERE category = '{0}'", categories),
        ("What is the price of the {0}?", "SELECT price FROM products WHERE name = '{0}'", [p[0] for p in PRODUCTS]),
        ("How many orders have the status {0}?", "SELECT COUNT(*) FROM orders WHERE status = '{0}'",
         [s[0] for s in STATUSES]),
        ("List the names of products that cost less than {0} dollars.", "SELECT name FROM products WHERE price < {0}",
         [5, 10, 15, 20, 25, 30]),
        ("How many orders were placed in {0} 2024?", "SELECT COUNT(*) FROM orders WHERE order_date LIKE '2024-{1}-%'",
         months),
        ("How many orders has {0} placed?", f"SELECT COUNT(*) {_JOIN_ORDERS} WHERE customers.name = '{{0}}'",
         buyers[:8]),
        ("What total quantity of the {0} has been ordered?",
         f"SELECT SUM(order_items.quantity) {_JOIN_ITEMS} WHERE products.name = '{{0}}'", bought[:8]),
    ]  # fmt: skip
    questions = []
    for question, gold_sql, values in families:
        for value in values or [()]:
            arguments = value if isinstance(value, tuple) else (value,)
            questions.append((question.format(*arguments), gold_sql.format(*arguments)))
    return questions


def check_gold(database: Path, question: str, gold_sql: str) -> None:
    rows = run_select(gold_sql, database)
    if not rows or any(value is None for row in rows for value in row) or rows == [(0,)]:
        raise SystemExit(f"gold query of {question!r} gives an empty result {rows}: {gold_sql}")


def split_questions(database: Path, seed: int) -> dict[str, list[dict[str, str]]]:
    """Shuffle the questions once and cut them into the files' disjoint task lists."""
    questions = all_questions(database)
    for question, gold_sql in questions:
        check_gold(database, question, gold_sql)
    needed = sum(count for _, _, count in SPLITS)
    if len(questions) < needed:
        raise SystemExit(f"{len(questions)} questions, but the splits need {needed}")
    random.Random(seed).shuffle(questions)
    splits, start = {}, 0
    for file_name, prefix, count in SPLITS:
        chosen = questions[start : start + count]
        start += count
        splits[file_name] = [
            {"id": f"{prefix}-{number:03d}", "question": question, "gold_sql": gold_sql}
            for number, (question, gold_sql) in enumerate(chosen, 1)
        ]
    return splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--db", type=Path, default=None, help="also write the database to this file (to inspect)")
    args = parser.parse_args(argv)
    (args.out / "data.sql").write_text(data_sql(args.seed), encoding="utf-8")
    print(f"wrote {args.out / 'data.sql'}")
    with tempfile.TemporaryDirectory() as scratch:
        database = Path(scratch) / "shop.db"
        build_database(database, SCHEMA_PATH, args.out / "data.sql")
        splits = split_questions(database, args.seed)
    for file_name, tasks in splits.items():
        path = args.out / file_name
        path.write_text("".join(json.dumps(task) + "\n" for task in tasks), encoding="utf-8")
        print(f"wrote {len(tasks)} tasks to {path}")
    if args.db is not None:
        args.db.unlink(missing_ok=True)
        build_database(args.db, SCHEMA_PATH, args.out / "data.sql")
        print(f"wrote {args.db}")


if __name__ == "__main__":
    main()
