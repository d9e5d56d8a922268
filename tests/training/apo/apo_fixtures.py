"""What the APO tests share (conftest.py makes the fixtures available): a policy whose answers depend
on its system prompt, a scripted optimizer, a transitions dataset of real failures, and a registry
holding the seed prompt. ``tests/pipelines/test_dag_apo.py`` imports it too.

The policy is the scripted OpenAI-compatible server (a real HTTP server) with a script that reads the
system message the agent's call arrived with: with the word ``EXACT`` in it, it solves the task
(through the calculator tool when the agent offers one); without it, it answers a wrong number. So
an edit that adds ``EXACT`` to the seed prompt is one a real agent measurably gains from, and the
words ``CRASH`` and ``HANG`` make the test agent (``prompt_agent.py``) exit with an error or hang.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support.calc_example import calc_spec
from support.scripted_llm_server import Reply, ScriptedLLMServer, arithmetic_expression, default_script

from tracelearn.registry import Registry, open_registry
from tracelearn.training.apo import ApoConfig, SearchSettings
from tracelearn.training.evaluate import evaluate_model

REPO = Path(__file__).resolve().parents[3]
TRAIN_TASKS = REPO / "examples" / "calc" / "tasks.jsonl"
VAL_TASKS = REPO / "examples" / "calc" / "tasks_val.jsonl"
HELD_OUT_TASKS = REPO / "examples" / "calc" / "tasks_heldout.jsonl"
PROMPT_AGENT = Path(__file__).with_name("prompt_agent.py")
SEED_PROMPT = "Solve the arithmetic. Use the calculator tool, then reply with the number only."
EXACT_PROMPT = "Solve the arithmetic. Use the calculator tool, then reply with the EXACT number only."
CRITIQUE = "The prompt never says the reply must be the exact number, so the agent guesses."


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def _system(body: dict[str, Any]) -> str:
    return next((str(m.get("content") or "") for m in body.get("messages") or [] if m.get("role") == "system"), "")


def _question(body: dict[str, Any]) -> str:
    return next((str(m.get("content") or "") for m in reversed(body.get("messages") or []) if m.get("role") == "user"),
                "")


def solve(question: str) -> str:
    """The right answer to a calc task ("What is 3 times 5?" -> "15")."""
    expression = arithmetic_expression(question)
    if not re.fullmatch(r"[\d\s+\-*/().]+", expression):
        return "0"
    value = eval(expression, {"__builtins__": {}})  # digits and operators only, checked above
    return str(int(value)) if float(value).is_integer() else str(value)


def policy_script(body: dict[str, Any]) -> Reply:
    """Right with ``EXACT`` in the system prompt, wrong without; ``CRASH`` / ``HANG`` for the test agent."""
    system = _system(body)
    for word in ("CRASH", "HANG"):
        if word in system:
            return Reply(text=word)
    if "EXACT" not in system:
        return Reply(text="I think it is -1")
    if body.get("tools"):
        return default_script(body)
    return Reply(text=solve(_question(body)))


class OptimizerScript:
    """The optimizer's answers: a fixed critique, then each edit request answered by the next of ``edits``
    (the last one repeats). ``edit_requests`` counts the edit requests; ``delay`` lets a test interrupt
    a call that is in flight."""

    def __init__(self, edits: Sequence[str], critique: str = CRITIQUE,
                 delay: Callable[[int], float] | None = None) -> None:
        self.edits = list(edits)
        self.critique = critique
        self.delay = delay
        self.edit_requests = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        user = _question(body)
        if "<critique>" not in user:
            return Reply(text=self.critique)
        with self._lock:
            self.edit_requests += 1
            number = self.edit_requests
        if self.delay is not None:
            threading.Event().wait(self.delay(number))
        return Reply(text=self.edits[min(number, len(self.edits)) - 1])


def prompt_block(text: str) -> str:
    return f"Here is the improved prompt:\n<prompt>\n{text}\n</prompt>"


@pytest.fixture(scope="session")
def policy() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer(policy_script) as server:
        yield server


@pytest.fixture(scope="session")
def failing_transitions(policy: ScriptedLLMServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real transitions dataset: the calc agent on 4 training tasks with the seed prompt, every rollout
    a failure (captured by opentelemetry-instrument, built and scored by the calc pipeline)."""
    workdir = tmp_path_factory.mktemp("collect")
    result = evaluate_model(policy.model, calc_spec(tasks=TRAIN_TASKS, limit=4, samples=1), workdir,
                            base_url=policy.base_url, console=quiet())
    assert result.successes == 0
    return result.data_dir


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A registry whose ``calc-system@production`` is the seed prompt (version 1)."""
    store = open_registry(tmp_path / "registry")
    version = store.publish_prompt("calc-system", SEED_PROMPT).version
    store.promote("calc-system", version.version, "production", reason="test: the agent's prompt")
    return store


@pytest.fixture
def optimizer() -> Iterator[Callable[[OptimizerScript], ScriptedLLMServer]]:
    """Start a scripted optimizer server with a given script (stopped after the test)."""
    servers: list[ScriptedLLMServer] = []

    def start(script: OptimizerScript) -> ScriptedLLMServer:
        servers.append(ScriptedLLMServer(script, model="optimizer").start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def passing_transitions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real transitions dataset without a failure: the default scripted model answers every task right."""
    with ScriptedLLMServer() as right:
        result = evaluate_model(right.model, calc_spec(tasks=TRAIN_TASKS, limit=2, samples=1),
                                tmp_path_factory.mktemp("passing"), base_url=right.base_url, console=quiet())
    assert result.successes == 2
    return result.data_dir


def first_tasks(source: Path, count: int, target: Path) -> Path:
    """The first ``count`` tasks of ``source`` as a tasks file of their own."""
    target.write_text("".join(line + "\n" for line in source.read_text(encoding="utf-8").splitlines()[:count]),
                      encoding="utf-8")
    return target


def apo_config(tmp_path: Path, transitions: Path, optimizer_url: str, policy_url: str, *,
               spec: dict[str, Any] | None = None, search: dict[str, Any] | None = None,
               **fields: Any) -> ApoConfig:
    """A small APO run on the first 3 validation tasks, one sample each, in ``tmp_path/apo``."""
    spec_fields: dict[str, Any] = {"tasks": VAL_TASKS, "limit": 3, "samples": 1, "agent_timeout_s": 120.0,
                                   **(spec or {})}
    fields = {"prompt": "calc-system@production", "out": tmp_path / "apo", "registry": str(tmp_path / "registry"),
              **fields}
    return ApoConfig(transitions=transitions, optimizer_url=optimizer_url, spec=calc_spec(**spec_fields),
                     search=SearchSettings(**{"rounds": 1, "beam": 1, "branch": 1, **(search or {})}),
                     policy_url=policy_url, **fields)
