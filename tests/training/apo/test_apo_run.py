"""APO end to end with real parts: the calc agent (and a registry-reading test agent) under
opentelemetry-instrument against a scripted policy, a scripted optimizer over HTTP, a real registry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from apo_fixtures import (
    CRITIQUE,
    EXACT_PROMPT,
    HELD_OUT_TASKS,
    PROMPT_AGENT,
    OptimizerScript,
    apo_config,
    first_tasks,
    prompt_block,
    quiet,
)
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.registry import ArtifactNotFoundError, Registry, open_registry
from tracelearn.schemas.dataset import dataset_files
from tracelearn.training.apo import InjectionError, load_failures, run_apo
from tracelearn.training.apo.candidates import prompt_hash
from tracelearn.training.run_dir import files_snapshot

StartOptimizer = Callable[[OptimizerScript], ScriptedLLMServer]


@pytest.mark.slow
def test_a_run_finds_a_better_prompt_publishes_it_with_lineage_and_the_gate_promotes_it(
        tmp_path: Path, policy: ScriptedLLMServer, failing_transitions: Path, registry: Registry,
        optimizer: StartOptimizer) -> None:
    script = OptimizerScript([prompt_block(EXACT_PROMPT), "Make it say that the number must be exact."])
    server = optimizer(script)
    gate_tasks = first_tasks(HELD_OUT_TASKS, 3, tmp_path / "gate_tasks.jsonl")
    config = apo_config(tmp_path, failing_transitions, server.base_url, policy.base_url,
                        search={"branch": 2}, gate_tasks=gate_tasks)

    result = run_apo(config, quiet())

    summary = result.summary
    assert summary["seed"]["score"]["successes"] == 0 and summary["winner"]["candidate"] == "r1.1"
    assert summary["winner"]["score"]["successes"] == 3 and summary["winner"]["vs_seed"]["significant"]
    assert summary["stop"] == "rounds" and summary["rounds_completed"] == 1
    assert summary["candidates"] == {"proposed": 2, "evaluated": 1, "failed": 0, "unevaluated": 0,
                                     "rejected": {"malformed_edit": 1}}
    assert summary["rollouts_run"] == 6, "seed and r1.1 on 3 tasks; the gate's rollouts are counted apart"
    # The tree: every candidate with its parent, critique, failures seen, score or rejection.
    tree = json.loads(result.files.tree.read_text())
    nodes = {node["id"]: node for node in tree["candidates"]}
    assert set(nodes) == {"seed", "r1.1", "r1.2"}
    assert nodes["r1.1"]["parent"] == "seed" and nodes["r1.1"]["critique"] == CRITIQUE
    assert nodes["r1.1"]["prompt"] == EXACT_PROMPT and len(nodes["r1.1"]["failures"]) == 4
    assert nodes["r1.1"]["score"]["interval_95"][0] > 0.4 and nodes["r1.1"]["vs_parent"]["pairs"] == 3
    assert nodes["r1.2"]["status"] == "rejected" and nodes["r1.2"]["rejection"]["kind"] == "malformed_edit"
    assert result.files.best_prompt.read_text() == EXACT_PROMPT
    # The candidate reached the agent: the gateway replaced the calc agent's hard-coded system message.
    systems = {m["content"] for body in policy.chat_requests() for m in body["messages"] if m["role"] == "system"}
    assert EXACT_PROMPT in systems

    # Published as calc-system@2 with its lineage, candidate, then production by the held-out gate.
    version = registry.version("calc-system", 2)
    assert registry.read_prompt("calc-system@candidate")[1] == EXACT_PROMPT
    lineage = version.lineage
    assert lineage.parent == "calc-system@1"
    assert lineage.pipeline_config_hash == load_failures(failing_transitions).config_hash
    assert lineage.dataset_snapshot == files_snapshot(dataset_files(failing_transitions / "transitions"))
    assert lineage.metrics["success_rate"] == 1.0 and lineage.metrics["seed_success_rate"] == 0.0
    assert lineage.metrics["optimizer_tokens"] == summary["optimizer"]["tokens"]["total_tokens"] > 0
    assert lineage.extra["method"] == "apo" and lineage.extra["path"] == ["seed", "r1.1"]
    assert lineage.extra["critique"] == CRITIQUE
    gate = summary["gate"]
    assert gate["held_out"] is True and gate["rollouts_run"] == 6, "winner and production on 3 held-out tasks"
    assert gate["decision"]["promote"] is True
    assert registry.aliases("calc-system")["production"] == 2
    assert json.loads(result.files.gate.read_text())["production"] == "calc-system@1"
    assert json.loads((result.files.gate_eval / "eval.json").read_text())["comparison"]["pairs"] == 3

    # The optimizer's calls are spans too: their tokens are the ones reported.
    calls = scan_spans(result.files.optimizer_spans).filter(pl.col("operation_name") == "chat").collect()
    assert calls.height == summary["optimizer"]["tokens"]["calls"] == 4
    assert calls["input_tokens"].sum() + calls["output_tokens"].sum() == summary["optimizer"]["tokens"]["total_tokens"]


@pytest.mark.slow
def test_template_variables_are_kept_and_a_crashing_or_hanging_agent_is_a_failed_candidate(
        tmp_path: Path, policy: ScriptedLLMServer, failing_transitions: Path,
        optimizer: StartOptimizer) -> None:
    store = open_registry(tmp_path / "registry")
    seed = store.publish_prompt("qa-system", "Answer this: {question}").version
    store.promote("qa-system", seed.version, "production")
    good = "Answer this: {question} with the EXACT number."
    script = OptimizerScript([
        prompt_block("Answer with the EXACT number."),  # drops {question}
        prompt_block("Answer this: {question} in {language}, EXACT."),  # invents {language}
        prompt_block('Answer this: {question} as {"n": EXACT}'),  # a brace that is no variable
        prompt_block("Answer this: {question}. CRASH"),  # the agent exits with an error
        prompt_block("Answer this: {question}. HANG"),  # the agent hangs until its timeout
        prompt_block(good),
    ])
    server = optimizer(script)
    config = apo_config(tmp_path, failing_transitions, server.base_url, policy.base_url, prompt="qa-system@production",
                        injection="registry", search={"branch": 6},
                        spec={"agent": ("python", str(PROMPT_AGENT)), "agent_timeout_s": 25.0})

    result = run_apo(config, quiet())

    nodes = {c.id: c for c in result.outcome.candidates}
    assert [nodes[f"r1.{n}"].status for n in range(1, 7)] == [
        "rejected", "rejected", "rejected", "failed", "failed", "evaluated"]
    assert [nodes[f"r1.{n}"].rejection.kind for n in range(1, 4)] == [  # type: ignore[union-attr]
        "variables_changed", "variables_changed", "unbalanced_braces"]
    assert "dropped {question}" in nodes["r1.1"].rejection.message  # type: ignore[union-attr]
    assert "invented {language}" in nodes["r1.2"].rejection.message  # type: ignore[union-attr]
    crashed, hung = nodes["r1.4"].score, nodes["r1.5"].score
    assert crashed is not None and "exited with code 1: the model told me to crash" in (crashed.agent_error or "")
    assert hung is not None and "ran past its timeout of 25 s and was killed" in (hung.agent_error or "")
    assert (crashed.successes, crashed.n, hung.successes, hung.n) == (0, 3, 0, 3), "recorded as failed rollouts"
    cache = next((tmp_path / "apo" / "cache").iterdir())
    cached = {path.name.partition("-")[0] for path in cache.glob("*.parquet")}
    assert prompt_hash(good) in cached and prompt_hash("Answer this: {question}. CRASH") not in cached, (
        "a failed agent run is not cached: a later evaluation tries again")

    assert result.outcome.winner is not None and result.outcome.winner.id == "r1.6"
    assert result.published is not None and result.published.ref == "qa-system@2"
    assert store.read_prompt("qa-system@candidate")[1] == good
    # The agent filled the variable itself: tracelearn.prompt resolved to the candidate for that run.
    systems = {m["content"] for body in policy.chat_requests() for m in body["messages"] if m["role"] == "system"}
    assert "Answer this: What is 3 times 5? with the EXACT number." in systems


def test_a_prompt_with_variables_is_refused_through_the_gateway(tmp_path: Path, failing_transitions: Path) -> None:
    store = open_registry(tmp_path / "registry")
    store.publish_prompt("qa-system", "Answer this: {question}")
    config = apo_config(tmp_path, failing_transitions, "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1",
                        prompt="qa-system@1")
    with pytest.raises(InjectionError, match=r"has template variables \(\{question\}\).*--inject registry"):
        run_apo(config, quiet())
    assert not (tmp_path / "apo").exists()


def test_the_seed_prompt_must_be_published(tmp_path: Path, failing_transitions: Path) -> None:
    config = apo_config(tmp_path, failing_transitions, "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    with pytest.raises(ArtifactNotFoundError,
                       match=r"--prompt calc-system@production: .*Publish the agent's system prompt first"):
        run_apo(config, quiet())
