"""The framework matrix: every supported agent framework with every instrumentation, run for real.

Each combination (``COMBINATIONS``) is a small one-tool agent (2 LLM calls per task: a tool call,
then the answer; 2 tasks) run in its own virtual environment (``envs.py``: tracelearn's base install
plus what a user would add for that framework and instrumentation) as a subprocess under
``opentelemetry-instrument`` against a real local OpenAI-compatible server that returns vLLM-shaped
token ids and logprobs. Then that environment's own ``tracelearn`` CLI runs ``spans stats`` and
``transitions build`` with no config (see ``matrix.py``).

What every combination must give is one test per check (``CHECKS``), so a failure names the
combination and the check:

- ``llm_rows``: ``spans stats`` counts as many LLM calls as the server answered (nested spans of
  one call counted once);
- ``messages``: each call's transition holds its prompt messages (the task's question in them) and
  its response, the tool-call step's response holding the calculator call;
- ``tool_results``: the answer step's prompt holds the tool's result (a ``tool`` message; smolagents
  sends results as an ``Observation:`` user turn, and the prompt must say what was sent);
- ``token_ids``: every LLM call's token-id status is ``server`` (``spans stats``), and every
  transition's prompt and response token ids and response logprobs are exactly the server's;
- ``agent_name``: every transition names the agent, where the framework names one and the
  instrumentation carries it (``agent_name`` is ``None`` in the table where it cannot be known);
- ``rollouts``: one rollout per task, each holding its 2 calls;
- ``transitions``: the default build (no config, run right after the agent) makes one transition per call.

Nothing is marked xfail: a combination that does not give all of this fails, and the README's
"Supported agents" table (``supported_agents_markdown``, checked by ``test_readme_table_is_generated``)
states exactly this contract.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from integration.frameworks import envs
from integration.frameworks.matrix import CALC_AGENT, Combination, Landed, run_combination
from support.scripted_llm_server import ScriptedLLMServer, logprob_of, prompt_ids, tool_result

README = envs.REPO / "README.md"
TASKS = 2
CALLS_PER_TASK = 2
AGENT_NAME = "calculator_agent"  # agents/calculator.py names every agent so (CrewAI: its role)
CREWAI_ROLE = "Calculator"
PLAIN_QUESTIONS = ("What is 12 times 34?", "What is 7 plus 8?")
PLAIN_SDK_AGENT = envs.REPO / "tests" / "integration" / "agents" / "plain_sdk_tool_agent.py"


@dataclass(frozen=True)
class Framework:
    label: str  # as the README names it
    agent: tuple[str, ...]  # the agent script and its arguments
    agent_name: str | None  # the name the agent is given, None where the framework has no such notion
    tool_results_as: str  # "tool": results travel as tool messages; "text": as a user turn
    env: tuple[tuple[str, str], ...] = ()  # variables the agent reads besides OPENAI_BASE_URL


FRAMEWORKS: dict[str, Framework] = {
    "openai-sdk-sync": Framework("OpenAI SDK (sync)", (str(CALC_AGENT), "--limit", "2"), None, "tool"),
    "openai-sdk-async": Framework("OpenAI SDK (async)", (str(CALC_AGENT), "--limit", "2", "--async"), None, "tool"),
    "openai-sdk-stream": Framework("OpenAI SDK (streaming)", (str(CALC_AGENT), "--limit", "2", "--stream"), None,
                                   "tool"),
    # The rollout-joining tests' agent: no span of its own, two tasks at once on threads (interleaved calls).
    "openai-sdk-no-span": Framework("OpenAI SDK, no span of its own",
                                    (str(PLAIN_SDK_AGENT), "--concurrency", "2", *PLAIN_QUESTIONS), None, "tool",
                                    env=(("OPENAI_API_KEY", "not-needed"),)),
    "openai-agents": Framework("OpenAI Agents SDK", ("openai_agents_sdk.py", *PLAIN_QUESTIONS), AGENT_NAME, "tool"),
    "pydantic-ai": Framework("Pydantic AI", ("pydantic_ai_agent.py", *PLAIN_QUESTIONS), AGENT_NAME, "tool"),
    "smolagents": Framework("smolagents (ToolCallingAgent)", ("smolagents_agent.py", *PLAIN_QUESTIONS), AGENT_NAME,
                            "text"),
    "crewai": Framework("CrewAI", ("crewai_agent.py", *PLAIN_QUESTIONS), CREWAI_ROLE, "tool"),
    "langgraph": Framework("LangGraph", ("langgraph_agent.py", *PLAIN_QUESTIONS), AGENT_NAME, "tool"),
}

# "-only": the Traceloop OpenAI instrumentation that tracelearn installs is uninstalled, so the
# convention named is the only one captured (with it, its client span fills whatever the other misses).
INSTRUMENTATIONS: dict[str, str] = {
    "traceloop": "Traceloop",
    "openinference": "OpenInference + Traceloop OpenAI",
    "openinference-only": "OpenInference alone",
    "genai": "official OpenTelemetry GenAI + Traceloop OpenAI",
    "genai-only": "official OpenTelemetry GenAI alone",
    "native": "Pydantic AI's own + Traceloop OpenAI",
    "native-only": "Pydantic AI's own alone",
}
WITHOUT_TRACELOOP_OPENAI = "`pip uninstall opentelemetry-instrumentation-openai`"


@dataclass(frozen=True)
class Row:
    """One combination and what it must give beyond the checks every combination passes."""

    framework: str
    instrumentation: str
    env: str
    names_agent: bool  # whether the spans can carry the agent's name (a framework-level span exists)
    agent_flags: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    note: str = ""  # what the user must do beyond installing the packages (README)

    def combination(self) -> Combination:
        framework = FRAMEWORKS[self.framework]
        script, *arguments = framework.agent
        name, _, variant = self.framework.partition("-sdk-")
        return Combination(
            framework=f"{name}-sdk" if variant else self.framework,
            variant=variant,
            instrumentation=self.instrumentation,
            env=self.env,
            argv=(script, *self.agent_flags, *arguments),
            extra_env={**dict(framework.env), **dict(self.extra_env)},
        )

    @property
    def id(self) -> str:
        return self.combination().id

    def expected_agent_name(self) -> str | None:
        return FRAMEWORKS[self.framework].agent_name if self.names_agent else None


def _sdk_rows() -> list[Row]:
    rows = [
        Row(f"openai-sdk-{variant}", family, f"openai-sdk-{family}", names_agent=False)
        for variant in ("sync", "async", "stream", "no-span")
        for family in ("traceloop", "openinference", "genai")
    ]
    alone = [
        Row(f"openai-sdk-{variant}", f"{family}-only", f"openai-sdk-{family}-only", names_agent=False,
            note=WITHOUT_TRACELOOP_OPENAI)
        for variant in ("sync", "stream")
        for family in ("openinference", "genai")
    ]
    return rows + alone


def _openinference_only(framework: str, agent_flags: tuple[str, ...] = ()) -> Row:
    note = WITHOUT_TRACELOOP_OPENAI
    if agent_flags:
        note = "the agent adds `OpenInferenceSpanProcessor` and calls `Agent.instrument_all()`; " + note
    return Row(framework, "openinference-only", f"{framework}-openinference-only", names_agent=True,
               agent_flags=agent_flags, note=note)


# The contract, one row per combination. names_agent is False where only the OpenAI client is
# instrumented (no span of the framework's carries the agent's name).
COMBINATIONS: list[Row] = [
    *_sdk_rows(),
    Row("openai-agents", "traceloop", "openai-agents-traceloop", names_agent=True),
    Row("openai-agents", "openinference", "openai-agents-openinference", names_agent=True),
    _openinference_only("openai-agents"),
    Row("openai-agents", "genai", "openai-agents-genai", names_agent=False),
    Row("pydantic-ai", "traceloop", "pydantic-ai-traceloop", names_agent=False),
    Row("pydantic-ai", "native", "pydantic-ai-traceloop", names_agent=True, agent_flags=("--native-otel",),
        note="the agent calls `Agent.instrument_all()`"),
    Row("pydantic-ai", "openinference", "pydantic-ai-openinference", names_agent=True,
        agent_flags=("--openinference",),
        note="the agent adds `OpenInferenceSpanProcessor` and calls `Agent.instrument_all()`"),
    _openinference_only("pydantic-ai", ("--openinference",)),
    Row("pydantic-ai", "native-only", "pydantic-ai-native-only", names_agent=True, agent_flags=("--native-otel",),
        note=f"the agent calls `Agent.instrument_all()`; {WITHOUT_TRACELOOP_OPENAI}"),
    Row("pydantic-ai", "genai", "pydantic-ai-genai", names_agent=False),
    Row("smolagents", "traceloop", "smolagents-traceloop", names_agent=False),
    Row("smolagents", "openinference", "smolagents-openinference", names_agent=True),
    _openinference_only("smolagents"),
    Row("smolagents", "genai", "smolagents-genai", names_agent=False),
    Row("crewai", "traceloop", "crewai-traceloop", names_agent=True),
    Row("crewai", "openinference", "crewai-openinference", names_agent=True),
    _openinference_only("crewai"),
    Row("crewai", "genai", "crewai-genai", names_agent=False),
    Row("langgraph", "traceloop", "langgraph-traceloop", names_agent=True),
    Row("langgraph", "openinference", "langgraph-openinference", names_agent=True),
    _openinference_only("langgraph"),
    Row("langgraph", "genai", "langgraph-genai", names_agent=False),
]
ROWS = {row.id: row for row in COMBINATIONS}


# --- Reading what landed ---------------------------------------------------------------------------


def _messages(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    parsed = json.loads(text)
    return parsed if isinstance(parsed, list) else [parsed]


def _text(message: dict[str, Any]) -> str:
    """Every piece of text in a message, whatever shape its content has (string, parts, tool calls)."""
    return json.dumps(message, ensure_ascii=False)


def _transitions(landed: Landed) -> list[dict[str, Any]]:
    table = landed.transitions()
    return [] if table is None else table.to_pylist()


def _questions(landed: Landed) -> list[str]:
    """The question each task started from (the last user message of its first request)."""
    firsts = [r for r in landed.requests if tool_result_of(r) is None]
    return [_content_text(next(m for m in reversed(r["messages"]) if m.get("role") == "user").get("content"))
            for r in firsts]


def tool_result_of(request: dict[str, Any]) -> str | None:
    results = [r for r in map(tool_result, request.get("messages") or []) if r is not None]
    return results[-1] if results else None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content or () if isinstance(p, dict))


def _answer_step(transitions: list[dict[str, Any]], result: str, role: str) -> bool:
    """Whether some transition's prompt ends with the tool result carried as ``role`` expects."""
    for transition in transitions:
        for message in _messages(transition["prompt_messages"]):
            text = _text(message)
            if role == "tool" and message.get("role") == "tool" and result in text:
                return True
            if role == "text" and message.get("role") == "user" and "Observation" in text and result in text:
                return True
    return False


# --- The checks (one test each per combination) ------------------------------------------------------


def check_llm_rows(row: Row, landed: Landed) -> None:
    assert landed.stats is not None, f"`tracelearn spans stats --json` failed: {landed.stats_error}"
    calls = len(landed.requests)
    assert calls == TASKS * CALLS_PER_TASK, f"the server answered {calls} calls, the agent should make 4"
    assert landed.stats["llm_calls"] == calls, (
        f"spans stats counts {landed.stats['llm_calls']} LLM calls, the server answered {calls}; "
        f"span types: {_span_types(landed)}"
    )


def check_messages(row: Row, landed: Landed) -> None:
    transitions = _transitions(landed)
    assert transitions, f"no transitions to read messages from; build said:\n{landed.build_output}"
    for transition in transitions:
        prompt = _messages(transition["prompt_messages"])
        assert prompt, f"transition {transition['span_id']} has no prompt messages"
        assert transition["response"], f"transition {transition['span_id']} has no response"
    for question in _questions(landed):
        prompts = [t for t in transitions if question in transition_prompt_text(t)]
        assert len(prompts) == CALLS_PER_TASK, f"{len(prompts)} transitions hold the question {question!r}, expect 2"
        assert any("calculator" in (t["response"] or "") for t in prompts), (
            f"no response of the task {question!r} holds the calculator call: "
            f"{[t['response'] for t in prompts]}"
        )


def transition_prompt_text(transition: dict[str, Any]) -> str:
    return " ".join(_content_text(m.get("content")) for m in _messages(transition["prompt_messages"]))


def check_tool_results(row: Row, landed: Landed) -> None:
    transitions = _transitions(landed)
    assert transitions, f"no transitions; build said:\n{landed.build_output}"
    results = [r for r in map(tool_result_of, landed.requests) if r is not None]
    assert len(results) == TASKS, f"the server saw {len(results)} tool results, expect {TASKS}"
    role = FRAMEWORKS[row.framework].tool_results_as
    for result in results:
        assert _answer_step(transitions, result, role), (
            f"no transition's prompt carries the tool result {result!r} as a {role} message"
        )


def check_token_ids(row: Row, landed: Landed, server: ScriptedLLMServer) -> None:
    transitions = _transitions(landed)
    assert len(transitions) == len(landed.requests), (
        f"{len(transitions)} transitions for {len(landed.requests)} calls; build said:\n{landed.build_output}"
    )
    statuses = (landed.stats or {}).get("token_ids_status")
    assert statuses == {"server": len(landed.requests)}, f"spans stats token_ids_status {statuses}"
    sources = sorted({str(t["token_ids_source"]) for t in transitions})
    assert sources == ["server"], f"token_ids_source {sources}, expect only 'server'"
    expected = sorted((prompt_ids(r["messages"]), server.response_token_ids(r)) for r in landed.requests)
    got = sorted((list(t["prompt_token_ids"]), list(t["response_token_ids"])) for t in transitions)
    assert got == expected, "prompt/response token ids differ from the ones the server returned"
    for transition in transitions:
        logprobs = [logprob_of(i) for i in transition["response_token_ids"]]
        assert transition["response_logprobs"] == pytest.approx(logprobs, abs=1e-6), "logprobs differ from the server's"


def check_agent_name(row: Row, landed: Landed) -> None:
    transitions = _transitions(landed)
    assert transitions, f"no transitions; build said:\n{landed.build_output}"
    names = sorted({str(t["agent_name"]) for t in transitions})
    assert names == [row.expected_agent_name()], f"agent names {names}, expect {row.expected_agent_name()!r}"


def check_rollouts(row: Row, landed: Landed) -> None:
    rollouts = landed.rollouts()
    assert rollouts is not None, f"the default build wrote no rollouts; it said:\n{landed.build_output}"
    calls = sorted(rollouts.column("n_llm_calls").to_pylist())
    assert calls == [CALLS_PER_TASK] * TASKS, (
        f"{rollouts.num_rows} rollouts holding {calls} LLM calls, expect {TASKS} rollouts of {CALLS_PER_TASK}; "
        f"identity: {rollouts.column('identity').to_pylist()}"
    )


def check_transitions(row: Row, landed: Landed) -> None:
    assert landed.build_returncode == 0, f"transitions build failed:\n{landed.build_output}"
    transitions = _transitions(landed)
    assert len(transitions) == len(landed.requests), (
        f"the default build made {len(transitions)} transitions for {len(landed.requests)} LLM calls:\n"
        f"{landed.build_output}"
    )
    per_rollout = sorted(
        sum(1 for t in transitions if t["rollout_id"] == rollout) for rollout in {t["rollout_id"] for t in transitions}
    )
    assert per_rollout == [CALLS_PER_TASK] * TASKS, f"transitions per rollout {per_rollout}"


def _span_types(landed: Landed) -> dict[str, int]:
    spans = landed.spans().column("span_type").to_pylist()
    return {kind: spans.count(kind) for kind in sorted(set(map(str, spans)))}


Check = Callable[..., None]
CHECKS: dict[str, Check] = {
    "llm_rows": check_llm_rows,
    "messages": check_messages,
    "tool_results": check_tool_results,
    "token_ids": check_token_ids,
    "agent_name": check_agent_name,
    "rollouts": check_rollouts,
    "transitions": check_transitions,
}


def checks_of(row: Row) -> list[str]:
    """The checks a combination must pass (agent_name only where the agent's name can be captured)."""
    return [name for name in CHECKS if name != "agent_name" or row.names_agent]


# --- The tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matrix_server() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer() as server:
        yield server


@pytest.fixture(scope="module")
def landed_runs(matrix_server: ScriptedLLMServer, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Row], Landed]:
    """Each combination runs once (made environment, agent, stats, build); its checks share the run."""
    runs: dict[str, Landed] = {}

    def landed(row: Row) -> Landed:
        if row.id not in runs:
            try:
                envs.create(row.env)
            except envs.EnvSetupError as error:
                pytest.fail(f"environment {row.env}: {error}", pytrace=False)
            runs[row.id] = run_combination(row.combination(), matrix_server, tmp_path_factory.mktemp(row.id))
        run = runs[row.id]
        assert run.returncode == 0, f"the agent exited {run.returncode}:\n{run.stderr[-4000:]}"
        return run

    return landed


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "check"),
    [pytest.param(row, check, id=f"{row.id}-{check}") for row in COMBINATIONS for check in checks_of(row)],
)
def test_combination(
    row: Row, check: str, landed_runs: Callable[[Row], Landed], matrix_server: ScriptedLLMServer
) -> None:
    landed = landed_runs(row)
    if check == "token_ids":
        check_token_ids(row, landed, matrix_server)
    else:
        CHECKS[check](row, landed)


# --- The README table ------------------------------------------------------------------------------

README_START = "<!-- supported-agents:start (generated by tests/integration/frameworks/write_matrix.py readme) -->"
README_END = "<!-- supported-agents:end -->"


FRAMEWORK_PACKAGES = frozenset(
    {"openai", "openai-agents", "pydantic-ai-slim[openai]", "smolagents[openai]", "crewai", "langgraph", "langchain",
     "langchain-openai"}
)
PINNED_FOR_A_REASON = frozenset({"opentelemetry-util-genai"})


def install_line(row: Row) -> str:
    """What a user adds to ``pip install tracelearn`` for this combination (from its environment's spec)."""
    spec = envs.SPECS / f"{row.env}.in"
    packages = [line.split("#")[0].strip() for line in spec.read_text(encoding="utf-8").splitlines()]
    added = [p for p in packages if p and p.split("==")[0] not in FRAMEWORK_PACKAGES]
    # Versions only where another version breaks (the pin is the point); otherwise the name.
    shown = [p if p.split("==")[0] in PINNED_FOR_A_REASON else p.split("==")[0] for p in added]
    return ", ".join(f"`{name}`" for name in shown) or "nothing"


README_GROUPS: tuple[tuple[str, str], ...] = (
    ("openai-sdk", "OpenAI SDK: sync, async, streaming, and an agent with no span of its own"),
    ("openai-agents", "OpenAI Agents SDK (Chat Completions model)"),
    ("pydantic-ai", "Pydantic AI"),
    ("smolagents", "smolagents (`ToolCallingAgent`)"),
    ("crewai", "CrewAI"),
    ("langgraph", "LangGraph (`create_agent`)"),
)
README_FAMILIES: tuple[tuple[str, str], ...] = (
    ("traceloop", "Traceloop"),
    ("openinference", "OpenInference"),
    ("genai", "official OpenTelemetry GenAI"),
    ("native", "the framework's own"),
)


def _cell(rows: list[Row], family: str) -> str:
    chosen = [row for row in rows if row.instrumentation == family]
    alone = [row for row in rows if row.instrumentation == f"{family}-only"]
    if not chosen and not alone:
        return "-"
    row = (chosen or alone)[0]
    text = f"+ {install_line(row)}" if install_line(row) != "nothing" else "nothing more"
    if row.note:
        text += f" ({row.note})"
    if chosen and alone:
        text += "; also alone"
    return text


def supported_agents_markdown() -> str:
    """The README's "Supported agents" table: what the matrix asserts, per framework and instrumentation."""
    intro = (
        "Every filled cell is a combination tested for real by `tests/integration/frameworks/`: a one-tool "
        "agent, two tasks of two LLM calls each (a tool call, then the answer), run under "
        "`opentelemetry-instrument` against a local vLLM-shaped server, in its own virtual environment holding "
        "`pip install tracelearn` plus the packages in the cell. Each one lands one LLM row per call (nested "
        "spans of one call counted once), the prompt and response messages with the tool call and the tool's "
        "result, the server's exact token ids with their logprobs, one rollout per task, and one transition per "
        "call from `tracelearn transitions build` with no config; the last column says where the agent's name "
        "is captured too. tracelearn installs Traceloop's OpenAI instrumentation, so the other columns run next "
        "to it; \"also alone\" means the combination is tested once more with it uninstalled "
        "(`pip uninstall opentelemetry-instrumentation-openai`), capturing that convention alone."
    )
    lines = [
        README_START,
        "",
        *textwrap.wrap(intro, width=105, break_long_words=False, break_on_hyphens=False),
        "",
        "| agent | " + " | ".join(label for _, label in README_FAMILIES) + " | agent name captured |",
        "|---|" + "---|" * len(README_FAMILIES) + "---|",
    ]
    for prefix, label in README_GROUPS:
        rows = [row for row in COMBINATIONS if row.framework.startswith(prefix)]
        cells = [_cell(rows, family) for family, _ in README_FAMILIES]
        named = [row for row in rows if row.names_agent]
        families = sorted({row.instrumentation.removesuffix("-only") for row in named},
                          key=[family for family, _ in README_FAMILIES].index)
        labels = dict(README_FAMILIES)
        name = f"`{named[0].expected_agent_name()}` ({', '.join(labels[f] for f in families)})" if named else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {name} |")
    lines += ["", README_END]
    return "\n".join(lines)


def readme_section(text: str) -> str | None:
    start, end = text.find(README_START), text.find(README_END)
    return text[start : end + len(README_END)] if start >= 0 and end > start else None


def test_readme_table_is_generated() -> None:
    section = readme_section(README.read_text(encoding="utf-8"))
    assert section is not None, f"README.md has no {README_START!r} ... {README_END!r} section"
    assert section == supported_agents_markdown(), (
        "README.md's Supported agents table differs from the matrix: "
        "run `python tests/integration/frameworks/write_matrix.py readme`"
    )


def _requirement(line: str) -> tuple[str, str]:
    """``(normalized name, version or "")`` of a requirement line such as ``smolagents[openai]==1.26.0  # why``."""
    text = line.split("#")[0].strip()
    name, _, version = text.partition("==")
    return name.split("[")[0].strip().lower().replace("_", "-"), version.strip()


def test_every_environment_is_locked() -> None:
    """Every environment the matrix uses has a spec and a lock made from it (envs.py lock), pinning what it asks."""
    for row in COMBINATIONS:
        spec, lock = envs.SPECS / f"{row.env}.in", envs.SPECS / f"{row.env}.txt"
        relock = f"run `python tests/integration/frameworks/envs.py lock {row.env}`"
        assert spec.is_file() and lock.is_file(), relock
        pinned = dict(_requirement(line) for line in lock.read_text(encoding="utf-8").splitlines() if "==" in line)
        for line in spec.read_text(encoding="utf-8").splitlines():
            if line.split("#")[0].strip():
                name, version = _requirement(line)
                assert name in pinned and version in ("", pinned[name]), f"{lock.name} does not pin {line}: {relock}"
    assert {row.env for row in COMBINATIONS} == set(envs.names()), "an environment is unused or missing"
