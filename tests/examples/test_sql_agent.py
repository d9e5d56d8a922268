"""The bundled sql agent: its execution-match reward (and what that reward refuses to run), its
writer/checker loop against the scripted server, and, under ``opentelemetry-instrument``, what the
pipeline makes of its two roles with the example's ``pipeline.yaml``."""

import datetime as dt
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow.compute as pc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.scripted_llm_server import Reply, ScriptedLLMServer

from tracelearn.pipelines.build import build_transitions
from tracelearn.pipelines.config import load_config
from tracelearn.pipelines.llm_calls import attach_token_ids
from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.schemas.dataset import read_table

REPO = Path(__file__).resolve().parents[2]
SQL = REPO / "examples" / "sql"
VENV_BIN = Path(sys.executable).parent
RUNAWAY = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"


def _load(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def reward(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # Under its sibling name, as agent.py imports it (and not the calc example's ``reward``).
    return _load("reward", SQL / "reward.py", monkeypatch)


@pytest.fixture
def agent(reward: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _load("sql_agent", SQL / "agent.py", monkeypatch)


@pytest.fixture
def writable_db(reward: ModuleType, tmp_path: Path) -> Path:
    """A fresh, writable copy of the shop database: a refusal must not rely on file permissions."""
    path = tmp_path / "shop.db"
    reward.build_database(path)
    return path


def read_tasks(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- The reward ---------------------------------------------------------------------------------------


def test_execution_match_compares_results_not_query_text(reward: ModuleType, writable_db: Path) -> None:
    gold = "SELECT COUNT(*) FROM customers WHERE city = 'Paris'"
    match = reward.execution_match
    assert match(gold, gold, writable_db) == 1.0
    assert match("select count(id) from customers where city='Paris'", gold, writable_db) == 1.0
    assert match("SELECT COUNT(*) FROM customers WHERE city = 'Rome'", gold, writable_db) == 0.0
    # Numbers compare by value: an average computed another way, an integer against a float.
    average = "SELECT AVG(price) FROM products WHERE category = 'kitchen'"
    assert match("SELECT SUM(price) / COUNT(*) FROM products WHERE category = 'kitchen'", average, writable_db) == 1.0
    assert match("SELECT 15.0", "SELECT COUNT(*) FROM customers", writable_db) == 1.0
    # Column order counts; an extra column is a different result.
    assert match("SELECT city, name FROM customers", "SELECT name, city FROM customers", writable_db) == 0.0
    assert match("SELECT name, id FROM customers", "SELECT name FROM customers", writable_db) == 0.0


def test_rows_compare_as_multisets_unless_the_gold_query_orders_them(reward: ModuleType, writable_db: Path) -> None:
    unordered = "SELECT name FROM customers WHERE city = 'Paris'"
    ordered = "SELECT name FROM customers WHERE city = 'Paris' ORDER BY name"
    reversed_ = "SELECT name FROM customers WHERE city = 'Paris' ORDER BY name DESC"
    assert len(reward.run_select(unordered, writable_db)) > 1
    assert reward.execution_match(reversed_, unordered, writable_db) == 1.0
    assert reward.execution_match(ordered, ordered, writable_db) == 1.0
    assert reward.execution_match(reversed_, ordered, writable_db) == 0.0
    # Multisets, not sets: duplicates matter.
    distinct = "SELECT DISTINCT city FROM customers"
    assert reward.execution_match("SELECT city FROM customers", distinct, writable_db) == 0.0
    assert reward.results_match([(1,), (2,), (2,)], [(2,), (1,), (2,)])
    assert not reward.results_match([(1,), (2,)], [(2,), (1,), (2,)])
    assert not reward.results_match([(1,), (2,)], [(2,), (1,)], ordered=True)


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM customers",
        "UPDATE products SET price = 0",
        "INSERT INTO customers VALUES (99, 'Mallory', 'Nowhere')",
        "DROP TABLE orders",
        "CREATE TABLE notes (x)",
        "ATTACH DATABASE '{other}' AS other",
        "VACUUM INTO '{other}'",
        "PRAGMA writable_schema = ON",
        "BEGIN",
        "REPLACE INTO customers VALUES (1, 'Mallory', 'Nowhere')",
        # Past the SELECT/WITH gate, stopped by the authorizer when prepared:
        "WITH doomed AS (SELECT id FROM customers) DELETE FROM customers WHERE id IN doomed",
        "WITH x AS (SELECT 1) INSERT INTO customers SELECT 99, 'Mallory', 'Nowhere' FROM x",
        "SELECT load_extension('/tmp/evil')",
        # A second statement is refused before the first runs.
        "SELECT 1; DELETE FROM customers",
        "SELECT 1; ATTACH DATABASE '{other}' AS other",
    ],
)
def test_a_write_is_refused_and_the_database_is_untouched(
    reward: ModuleType, writable_db: Path, tmp_path: Path, statement: str
) -> None:
    other = tmp_path / "other.db"
    sql = statement.format(other=other)
    before = (hashlib.sha256(writable_db.read_bytes()).hexdigest(), writable_db.stat().st_mtime_ns)

    with pytest.raises(reward.QueryError) as refused:
        reward.run_select(sql, writable_db)
    assert refused.value.reason == "refused", refused.value
    assert reward.execution_match(sql, "SELECT COUNT(*) FROM customers", writable_db) == 0.0

    assert (hashlib.sha256(writable_db.read_bytes()).hexdigest(), writable_db.stat().st_mtime_ns) == before
    assert not other.exists(), "nothing was attached or written elsewhere"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.db"], "no journal, no new file"
    assert reward.run_select("SELECT COUNT(*) FROM customers", writable_db) == [(15,)]


def test_the_cached_database_file_is_read_only(reward: ModuleType) -> None:
    path = reward.shop_database()
    assert path.stat().st_mode & 0o222 == 0
    assert reward.run_select("SELECT COUNT(*) FROM products") == [(12,)]


@pytest.mark.parametrize(
    "runaway",
    [
        RUNAWAY,
        "SELECT COUNT(*) FROM order_items a, order_items b, order_items c, order_items d, order_items e",
    ],
    ids=["recursive-cte", "cross-join"],
)
def test_a_runaway_query_is_cut_off(reward: ModuleType, writable_db: Path, runaway: str) -> None:
    started = time.monotonic()
    with pytest.raises(reward.QueryError) as stopped:
        reward.run_select(runaway, writable_db, timeout_s=0.2)
    assert stopped.value.reason == "timeout"
    assert reward.execution_match(runaway, "SELECT COUNT(*) FROM orders", writable_db, timeout_s=0.2) == 0.0
    assert time.monotonic() - started < 3.0


def test_too_many_rows_are_not_fetched(reward: ModuleType, writable_db: Path) -> None:
    with pytest.raises(reward.QueryError) as refused:
        reward.run_select("SELECT * FROM order_items a, order_items b", writable_db, max_rows=100)
    assert refused.value.reason == "too_many_rows"
    with pytest.raises(reward.QueryError) as huge:
        reward.run_select("SELECT randomblob(100000000)", writable_db)
    assert huge.value.reason == "error" and "too big" in str(huge.value)


@pytest.mark.parametrize(
    "malformed",
    ["SELEC name FROM customers", "SELECT nme FROM customers", "SELECT name FROM", "", "   ;  ",
     "I think there are 15 customers.", "SELECT name FROM customers WHERE city = 'Paris"],
)  # fmt: skip
def test_malformed_sql_scores_zero(reward: ModuleType, writable_db: Path, malformed: str) -> None:
    assert reward.execution_match(malformed, "SELECT name FROM customers", writable_db) == 0.0


def test_a_broken_gold_query_raises_instead_of_scoring(reward: ModuleType, writable_db: Path) -> None:
    with pytest.raises(ValueError, match="gold query failed"):
        reward.execution_match("SELECT 1", "SELECT nothing FROM nowhere", writable_db)


@pytest.mark.parametrize(
    ("reply", "sql"),
    [
        ("SELECT COUNT(*) FROM customers", "SELECT COUNT(*) FROM customers"),
        ("```sql\nSELECT name\nFROM customers;\n```", "SELECT name\nFROM customers"),
        ("Here is the query:\n```\nselect 1\n```\nIt selects one.", "select 1"),
        ("The query is SELECT name FROM products; it lists products.", "SELECT name FROM products"),
        ("WITH t AS (SELECT 1) SELECT * FROM t;", "WITH t AS (SELECT 1) SELECT * FROM t"),
        ("no query here", "no query here"),
    ],
)
def test_extract_sql(reward: ModuleType, reply: str, sql: str) -> None:
    assert reward.extract_sql(reply) == sql


def _llm_span(agent: str, text: str) -> dict[str, Any]:
    response = json.dumps([{"role": "assistant", "content": text}])
    return {"span_type": "llm", "agent_name": agent, "output_messages": response}


def test_the_pipeline_function_scores_the_writers_last_reply(reward: ModuleType) -> None:
    gold = "SELECT COUNT(*) FROM customers"
    spans = [
        _llm_span("writer", "SELECT 1"),
        _llm_span("checker", "REJECT: count the customers"),
        _llm_span("writer", "```sql\nSELECT COUNT(*) FROM customers;\n```"),
        _llm_span("checker", "ACCEPT"),  # the rollout's last LLM call, and not the answer
        {"span_type": "reward", "agent_name": None, "output_messages": None},
    ]
    assert reward.score(spans, gold) == 1.0
    assert reward.score(spans[:2], gold) == 0.0
    with pytest.raises(ValueError, match="no LLM call by agent 'writer'"):
        reward.score([_llm_span("checker", "SELECT COUNT(*) FROM customers")], gold)


# --- The task files -----------------------------------------------------------------------------------


def test_make_data_rewrites_the_committed_files(
    reward: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_data = _load("sql_make_data", SQL / "make_data.py", monkeypatch)
    make_data.main(["--out", str(tmp_path)])
    for name in ("data.sql", "tasks.jsonl", "tasks_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (SQL / name).read_bytes(), f"{name}: run examples/sql/make_data.py"
    train, held = read_tasks(SQL / "tasks.jsonl"), read_tasks(SQL / "tasks_heldout.jsonl")
    assert (len(train), len(held)) == (50, 25)
    assert not {t["question"] for t in train} & {t["question"] for t in held}
    assert len({t["id"] for t in train + held}) == 75
    for task in train + held:
        assert reward.run_select(task["gold_sql"]), task


# --- The agent ----------------------------------------------------------------------------------------


class ScriptedTeam:
    """Scripted writer and checker for the first four tasks, one behaviour each (by file order):

    - ``right``: the writer's first draft is the gold query (fenced); the checker accepts.
    - ``fixed``: the first draft fails; the checker rejects it with a note; the second is right.
    - ``mixed``: one sample's first draft is right, the other's returns no rows; the lax checker
      accepts both (it only rejects errors), so the group has rewards 1 and 0: GRPO signal.
    - ``hopeless``: every draft fails and is rejected, until the rounds run out.
    """

    KINDS = ("right", "fixed", "mixed", "hopeless")
    NOTE = "REJECT: the query fails; check the table and column names."

    def __init__(self, agent: ModuleType, tasks: list[dict[str, str]]) -> None:
        self.agent = agent
        self.tasks = {t["question"]: (kind, t["gold_sql"]) for kind, t in zip(self.KINDS, tasks, strict=False)}
        self.first_drafts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        messages = body["messages"]
        system, user = messages[0]["content"], messages[1]["content"]
        question = user.split("Question: ", 1)[1].split("\n", 1)[0]
        kind, gold = self.tasks[question]
        if system == self.agent.WRITER_PROMPT:
            return Reply(text=self.draft(kind, gold, question, sum(m["role"] == "assistant" for m in messages)))
        assert system == self.agent.CHECKER_PROMPT
        return Reply(text=self.NOTE if "\nError" in user else "ACCEPT")

    def draft(self, kind: str, gold: str, question: str, round_: int) -> str:
        if kind == "right":
            return f"```sql\n{gold};\n```"
        if kind == "fixed":
            return "SELECT nme FROM customer" if round_ == 0 else f"Corrected: {gold}; it now runs."
        if kind == "mixed":
            with self.lock:
                self.first_drafts[question] += 1
                first = self.first_drafts[question] == 1
            return gold if first else "SELECT name FROM products WHERE price > 1000"
        return "SELECT nme FROM customer"


EXPECTED = {  # kind -> (writer drafts per sample, rewards of the group)
    "right": (1, [1.0, 1.0]),
    "fixed": (2, [1.0, 1.0]),
    "mixed": (1, [0.0, 1.0]),
    "hopeless": (3, [0.0, 0.0]),
}
AGENT_ARGS = ["--limit", "4", "--samples", "2", "--seed", "5", "--max-rounds", "3", "--max-tokens", "256"]


def kinds_by_id(tasks: list[dict[str, str]]) -> dict[str, str]:
    return {t["id"]: kind for kind, t in zip(ScriptedTeam.KINDS, tasks, strict=False)}


def check_report_lines(lines: list[dict[str, Any]], tasks: list[dict[str, str]]) -> None:
    kinds = kinds_by_id(tasks)
    assert sorted((line["id"], line["sample"]) for line in lines) == [(t, s) for t in sorted(kinds) for s in (0, 1)]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_task[line["id"]].append(line)
    for task_id, kind in kinds.items():
        rounds, rewards = EXPECTED[kind]
        assert [line["rounds"] for line in by_task[task_id]] == [rounds, rounds], kind
        assert sorted(line["reward"] for line in by_task[task_id]) == rewards, kind
        assert all(line["accepted"] == (kind != "hopeless") for line in by_task[task_id]), kind


def test_the_writer_and_checker_loop(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = read_tasks(SQL / "tasks.jsonl")[:4]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(agent, "tracer", provider.get_tracer("examples.sql"))
    with ScriptedLLMServer(ScriptedTeam(agent, tasks)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        agent.main(AGENT_ARGS)
        requests = server.chat_requests()

    check_report_lines([json.loads(line) for line in capsys.readouterr().out.splitlines()], tasks)
    assert len(requests) == 2 * (1 + 1) + 2 * (2 + 2) + 2 * (1 + 1) + 2 * (3 + 3)
    # Every request carries its own seed: task, sample, role and round each change it.
    assert len({r["seed"] for r in requests}) == len(requests)
    revisions = [r for r in requests if r["messages"][0]["content"] == agent.WRITER_PROMPT and len(r["messages"]) > 2]
    assert revisions and all(ScriptedTeam.NOTE in r["messages"][-1]["content"] for r in revisions)
    assert all("Error: no such table: customer" in r["messages"][-1]["content"] for r in revisions)
    spans = exporter.get_finished_spans()
    task_spans = [s for s in spans if s.name == "sql.task"]
    assert len(task_spans) == 8
    assert {(s.attributes or {})["tracelearn.metadata.gold_sql"] for s in task_spans} == {t["gold_sql"] for t in tasks}
    rewards = [s for s in spans if s.name == "tracelearn.reward"]
    assert sorted((r.attributes or {})["tracelearn.reward.value"] for r in rewards) == [0.0] * 3 + [1.0] * 5
    assert {(r.attributes or {})["tracelearn.reward.name"] for r in rewards} == {"execution_match"}


def test_the_checker_verdict(agent: ModuleType) -> None:
    assert agent.accepted("ACCEPT") and agent.accepted("accept.") and agent.accepted("I ACCEPT it; do not REJECT")
    assert not agent.accepted("REJECT: wrong table") and not agent.accepted("Reject, then accept")
    assert not agent.accepted("Looks fine to me"), "a review without a verdict is a rejection"


def test_under_opentelemetry_instrument_only_writer_calls_become_transitions(
    agent: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = read_tasks(SQL / "tasks.jsonl")[:4]
    env = {
        **os.environ,
        "TRACELEARN_DATA": str(tmp_path / "data"),
        "OTEL_SERVICE_NAME": "sql-agent",
        "OPENAI_API_KEY": "not-needed",
    }
    with ScriptedLLMServer(ScriptedTeam(agent, tasks)) as server:
        env["OPENAI_BASE_URL"] = server.base_url
        command = [str(VENV_BIN / "opentelemetry-instrument"), "--traces_exporter", "tracelearn", sys.executable]
        result = subprocess.run(
            [*command, str(SQL / "agent.py"), *AGENT_ARGS, "--concurrency", "2"],
            env=env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    check_report_lines(lines, tasks)

    # The capture: both roles' calls, each named after its LangGraph node, without tracelearn imported.
    spans = attach_token_ids(scan_spans(tmp_path / "data")).collect().to_arrow()
    llm = spans.filter(pc.equal(spans.column("span_type"), "llm"))
    assert Counter(llm.column("agent_name").to_pylist()) == {"writer": 14, "checker": 14}
    task_rows = spans.filter(pc.equal(spans.column("name"), "sql.task")).to_pylist()
    sample_of = {row["rollout_id"]: int(dict(row["attributes"])["tracelearn.metadata.sample"]) for row in task_rows}
    assert len(sample_of) == 8

    now = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    built = build_transitions(tmp_path / "data", tmp_path / "out", load_config(SQL / "pipeline.yaml"), now=now)
    summary = built.summary
    assert summary["rollouts"] == 8 and summary["function_rewards"] == 8, summary
    assert summary["function_reward_errors"] == summary["function_reward_missing_input"] == 0, summary
    assert (summary["transitions"], summary["without_token_ids"]) == (14, 0), summary
    assert (summary["groups"], summary["zero_signal_groups"]) == (4, 3), summary

    rollouts = read_table(tmp_path / "out" / "rollouts", "rollouts").to_pylist()
    transitions = read_table(tmp_path / "out" / "transitions", "transitions").to_pylist()
    assert {t["agent_name"] for t in transitions} == {"writer"}
    assert {t["token_ids_source"] for t in transitions} == {"server"}
    reported = {(line["id"], line["sample"]): line for line in lines}
    kinds = kinds_by_id(tasks)
    advantages: dict[str, set[tuple[float, float]]] = defaultdict(set)
    for rollout in rollouts:
        line = reported[(rollout["task_id"], sample_of[rollout["rollout_id"]])]
        assert set(rollout["agents"]) >= {"writer", "checker"}
        assert rollout["reward_name"] == "execution_match"
        assert dict(rollout["rewards"]) == {"execution_match": line["reward"]}
        steps = [t for t in transitions if t["rollout_id"] == rollout["rollout_id"]]
        assert sorted(t["step_index"] for t in steps) == list(range(line["rounds"]))
        assert {t["reward"] for t in steps} == {line["reward"]}
        advantages[rollout["task_id"]].update((line["reward"], t["advantage"]) for t in steps)
    for task_id, kind in kinds.items():
        by_reward = dict(advantages[task_id])  # one advantage per rollout: the same for its every step
        assert len(by_reward) == len(advantages[task_id])
        if kind == "mixed":
            assert by_reward[1.0] > 0 > by_reward[0.0] and by_reward[1.0] == pytest.approx(-by_reward[0.0])
        else:
            assert set(by_reward.values()) == {0.0}, "equal rewards in the group: no signal"
    # The writer's second draft was prompted with the checker's note (the checker is context, not trained).
    revisions = [t for t in transitions if t["step_index"] == 1]
    assert revisions and all(ScriptedTeam.NOTE in json.loads(t["prompt_messages"])[-1]["content"] for t in revisions)
