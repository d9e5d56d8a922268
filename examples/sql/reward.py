"""The sql example's reward: execution match of the writer's final query on the shop database.

The query the writer settled on and the task's gold query both run on the shipped database; the
reward is 1.0 when they return the same rows, else 0.0. Rows compare as multisets (order does not
matter) unless the gold query has an ORDER BY, then as lists; numbers compare rounded to 6 places
(``3 == 3.0``); column names do not matter, column order does. A query that fails, is refused, runs
too long or returns too many rows scores 0.0. A gold query that fails is a broken task: it raises.

Only reads run, and only briefly (``run_select``):

- the database opens read-only (``file:...?mode=ro``, ``PRAGMA query_only``), the file itself is
  read-only on disk, and no other database can be attached (``SQLITE_LIMIT_ATTACHED`` 0);
- the statement must begin with SELECT or WITH, and an authorizer allows only reading
  tables, calling functions (not ``load_extension``) and recursive CTEs: writes, schema changes,
  ATTACH (``VACUUM INTO`` too), PRAGMA and transactions are refused when the statement is prepared,
  so they never run;
- one statement per call (sqlite3 refuses a second one before running the first), at most
  ``MAX_SQL_CHARS`` characters, values at most ``MAX_VALUE_BYTES`` (``randomblob(1e9)`` fails);
- a progress handler interrupts a query after ``timeout_s`` (a runaway recursive CTE or cross join),
  and at most ``max_rows`` rows are fetched.

The database is built from ``schema.sql`` and ``data.sql`` (committed; ``make_data.py`` writes the
data) into a cache file in the temp directory named by their digest, so the agent, the pipeline and
the tests run on the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "schema.sql"
DATA_PATH = HERE / "data.sql"
WRITER = "writer"  # the agent whose reply holds the query

DEFAULT_TIMEOUT_S = 2.0
MAX_ROWS = 10_000
MAX_SQL_CHARS = 10_000
MAX_VALUE_BYTES = 1_000_000
_PROGRESS_STEPS = 1_000  # SQLite virtual-machine steps between deadline checks
_ALLOWED_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
_DENIED_FUNCTIONS = frozenset({"load_extension"})
_READ_STATEMENT = re.compile(r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*(select|with)\b", re.IGNORECASE | re.DOTALL)
_FENCED = re.compile(r"```[ \t]*(?:sqlite|sql)?[ \t]*\n?(.*?)(?:```|$)", re.IGNORECASE | re.DOTALL)
_QUERY_START = re.compile(r"\b(select|with)\b", re.IGNORECASE)
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


class QueryError(ValueError):
    """A query that did not produce rows; ``reason`` is refused, timeout, too_many_rows or error."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- The database -----------------------------------------------------------------------------------


def build_database(path: Path, schema: Path = SCHEMA_PATH, data: Path = DATA_PATH) -> None:
    """Write the shop database (``schema.sql`` then ``data.sql``) to ``path``, which must not exist."""
    connection = sqlite3.connect(path)
    try:
        connection.executescript(schema.read_text(encoding="utf-8") + data.read_text(encoding="utf-8"))
        connection.commit()
    finally:
        connection.close()


@functools.cache
def shop_database() -> Path:
    """The cached, read-only shop database file, built on first use (atomically: processes may race)."""
    digest = hashlib.sha256(SCHEMA_PATH.read_bytes() + b"\0" + DATA_PATH.read_bytes()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "tracelearn-examples" / f"shop-{digest}.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(descriptor)
        try:
            Path(temporary).unlink()  # sqlite3 creates it
            build_database(Path(temporary))
            Path(temporary).chmod(0o444)
            Path(temporary).replace(path)
        finally:
            Path(temporary).unlink(missing_ok=True)
    return path


def schema_text() -> str:
    """The CREATE TABLE statements, as the agent shows them to its model."""
    return SCHEMA_PATH.read_text(encoding="utf-8").strip()


# --- Running a query safely -------------------------------------------------------------------------


def _authorize(action: int, arg1: str | None, arg2: str | None, database: str | None, trigger: str | None) -> int:
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def _read_only_connection(database: Path, timeout_s: float) -> sqlite3.Connection:
    connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    connection.execute("PRAGMA query_only = ON")  # before the authorizer, which refuses every PRAGMA
    connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    connection.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS)
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    connection.set_authorizer(_authorize)
    deadline = time.monotonic() + timeout_s
    connection.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
    return connection


def run_select(
    sql: str,
    database: Path | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = MAX_ROWS,
) -> list[tuple[Any, ...]]:
    """The rows of one read-only query on ``database`` (default: the shop database).

    Raises :class:`QueryError`: ``refused`` (not a single SELECT: a write, ATTACH, PRAGMA, a second
    statement), ``timeout`` (ran past ``timeout_s``), ``too_many_rows`` (more than ``max_rows``) or
    ``error`` (syntax, unknown column, ...). Nothing but reads ever runs.
    """
    query = sql.strip().rstrip(";").strip()
    if not query:
        raise QueryError("error", "no SQL")
    if len(query) > MAX_SQL_CHARS:
        raise QueryError("refused", f"the query is longer than {MAX_SQL_CHARS} characters")
    if not _READ_STATEMENT.match(query):
        raise QueryError("refused", "only SELECT queries run (the statement must begin with SELECT or WITH)")
    try:
        connection = _read_only_connection(database or shop_database(), timeout_s)
    except sqlite3.Error as error:
        raise QueryError("error", f"cannot open the database ({error})") from None
    try:
        rows = connection.execute(query).fetchmany(max_rows + 1)
    except sqlite3.ProgrammingError as error:  # "You can only execute one statement at a time."
        raise QueryError("refused", str(error)) from None
    except sqlite3.Error as error:
        message = str(error)
        if "not authorized" in message:
            raise QueryError("refused", message) from None
        if "interrupted" in message:
            raise QueryError("timeout", f"the query ran longer than {timeout_s:g} s") from None
        raise QueryError("error", message) from None
    finally:
        connection.close()
    if len(rows) > max_rows:
        raise QueryError("too_many_rows", f"the query returned more than {max_rows} rows")
    return rows


# --- Comparing results ------------------------------------------------------------------------------


def _normalized(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(round(float(v), 6) if isinstance(v, int | float) else v for v in row)


def results_match(got: Iterable[Sequence[Any]], gold: Iterable[Sequence[Any]], ordered: bool = False) -> bool:
    """Whether two results hold the same rows: as lists when ``ordered``, else as multisets."""
    got_rows, gold_rows = [_normalized(r) for r in got], [_normalized(r) for r in gold]
    return got_rows == gold_rows if ordered else Counter(got_rows) == Counter(gold_rows)


def extract_sql(text: str) -> str:
    """The query in a model's reply: a fenced block's content, else from the first SELECT/WITH to ``;``."""
    fenced = _FENCED.search(text)
    if fenced and _QUERY_START.search(fenced.group(1)):
        text = fenced.group(1)
    start = _QUERY_START.search(text)
    if start is None:
        return text.strip()
    return text[start.start() :].split(";", 1)[0].strip()


def execution_match(
    sql: str, gold_sql: str, database: Path | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> float:
    """1.0 when ``sql`` returns the rows ``gold_sql`` returns (see the module docstring), else 0.0."""
    try:
        gold = run_select(gold_sql, database, timeout_s=timeout_s)
    except QueryError as error:
        raise ValueError(f"the gold query failed ({error}): {gold_sql}") from None
    try:
        got = run_select(sql, database, timeout_s=timeout_s)
    except QueryError:
        return 0.0
    return 1.0 if results_match(got, gold, ordered=bool(_ORDER_BY.search(gold_sql))) else 0.0


# --- The pipeline's reward function -----------------------------------------------------------------


def _reply_text(output_messages: Any) -> str:
    messages = json.loads(output_messages) if isinstance(output_messages, str) else output_messages or []
    texts = []
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return "".join(texts)


def final_writer_reply(spans: Sequence[Mapping[str, Any]]) -> str:
    """The text of the rollout's last LLM call made by the writer (``spans`` ordered by start time)."""
    replies = [
        s for s in spans if s.get("span_type") == "llm" and s.get("agent_name") == WRITER and s.get("output_messages")
    ]
    if not replies:
        agents = sorted({str(s.get("agent_name")) for s in spans if s.get("span_type") == "llm"})
        raise ValueError(f"the rollout has no LLM call by agent {WRITER!r} (LLM calls by: {agents or 'none'})")
    return _reply_text(replies[-1]["output_messages"])


def score(spans: Sequence[Mapping[str, Any]], gold_sql: str) -> float:
    """Pipeline reward (``reward.function: reward.py:score``): execution match of the SQL in
    the writer's last reply against ``gold_sql``, the task's gold query (``tracelearn.metadata.gold_sql``).

    The final query is always the writer's last draft (the checker accepted it, or the rounds ran
    out), so the reward depends only on what the trained agent wrote. The last LLM call of a rollout
    is the checker's, which is why this reads ``spans`` rather than ``answer``.
    """
    return execution_match(extract_sql(final_writer_reply(spans)), gold_sql)
