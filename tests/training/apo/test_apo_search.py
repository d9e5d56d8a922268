"""The search's edges with real parts: the evaluation cache, the budgets, an agent that fails on the seed,
and transitions without a failure."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from apo_fixtures import EXACT_PROMPT, SEED_PROMPT, VAL_TASKS, OptimizerScript, apo_config, prompt_block, quiet
from support.calc_example import calc_spec
from support.scripted_llm_server import ScriptedLLMServer

from tracelearn.registry import Registry, open_registry
from tracelearn.training.apo import NoFailuresError, PromptEvaluator, SeedEvaluationError, run_apo
from tracelearn.training.eval_serving import ServedModel

StartOptimizer = Callable[[OptimizerScript], ScriptedLLMServer]


def _task_calls(server: ScriptedLLMServer) -> int:
    return len(server.chat_requests())


@pytest.mark.slow
def test_a_repeated_evaluation_comes_from_the_cache_and_runs_no_agent(tmp_path: Path,
                                                                      policy: ScriptedLLMServer) -> None:
    served = ServedModel(policy.base_url, policy.model, None)
    registry = open_registry(tmp_path / "registry")

    def evaluator(limit: int, seed: int = 4) -> PromptEvaluator:
        return PromptEvaluator("calc-system", calc_spec(tasks=VAL_TASKS, limit=limit, samples=2, seed=seed), served,
                               registry, tmp_path / "evaluations", tmp_path / "cache", quiet())

    first = evaluator(3).evaluate("a", EXACT_PROMPT)
    assert (first.rollouts_run, first.result.n, first.result.successes) == (6, 6, 6)
    assert first.gateway.substituted == first.gateway.chat_calls > 0
    calls = _task_calls(policy)

    again = evaluator(3).evaluate("b", EXACT_PROMPT)  # another candidate id, the same text
    assert (again.rollouts_run, again.evaluated_as) == (0, None)
    assert _task_calls(policy) == calls, "no agent ran, no model call was made"
    assert again.result.rollouts.drop("rollout_id").equals(first.result.rollouts.drop("rollout_id"))
    assert again.result.rollouts["rollout_id"].to_list() == first.result.rollouts["rollout_id"].to_list()

    more = evaluator(4).evaluate("c", EXACT_PROMPT)  # one task more: only that task runs
    assert (more.rollouts_run, more.result.n) == (2, 8)
    assert evaluator(4).rollouts_needed(EXACT_PROMPT) == 0 and evaluator(4).rollouts_needed(SEED_PROMPT) == 8
    assert evaluator(3, seed=5).rollouts_needed(EXACT_PROMPT) == 6, "the seed is part of the key"


def test_the_rollout_budget_stops_before_an_evaluation_it_cannot_pay_for(
        tmp_path: Path, policy: ScriptedLLMServer, failing_transitions: Path, registry: Registry,
        optimizer: StartOptimizer) -> None:
    server = optimizer(OptimizerScript([prompt_block(EXACT_PROMPT)]))
    config = apo_config(tmp_path, failing_transitions, server.base_url, policy.base_url,
                        search={"rounds": 3, "max_rollouts": 5})

    result = run_apo(config, quiet())

    assert result.outcome.stop == "rollouts" and result.outcome.rollouts_run == 3
    assert "3 of 5 rollouts run, and evaluating r1.1 takes 3 more" in result.outcome.stop_reason
    (edit,) = [c for c in result.outcome.candidates if c.id != "seed"]
    assert edit.status == "unevaluated" and edit.prompt == EXACT_PROMPT
    assert result.outcome.winner is None and result.published is None
    assert [v.version for v in registry.versions("calc-system")] == [1], "the registry is left alone"
    assert not (result.files.rounds / "round-1.json").exists(), "the interrupted round is not complete"
    assert json.loads(result.files.tree.read_text())["candidates"][1]["status"] == "unevaluated"


@pytest.mark.slow
def test_the_token_budget_stops_before_the_next_proposal(
        tmp_path: Path, policy: ScriptedLLMServer, failing_transitions: Path, registry: Registry,
        optimizer: StartOptimizer) -> None:
    server = optimizer(OptimizerScript([prompt_block(EXACT_PROMPT), prompt_block(EXACT_PROMPT + " Now.")]))
    config = apo_config(tmp_path, failing_transitions, server.base_url, policy.base_url,
                        search={"branch": 3, "max_optimizer_tokens": 100})

    result = run_apo(config, quiet())

    assert result.outcome.stop == "tokens"
    assert [c.id for c in result.outcome.candidates] == ["seed", "r1.1"], "one proposal, then the budget was spent"
    assert result.outcome.tokens.total > 100 and result.outcome.tokens.calls == 2
    assert f"({result.outcome.tokens.total} of 100 tokens)" in result.outcome.stop_reason
    assert result.summary["optimizer"]["tokens"]["total_tokens"] == result.outcome.tokens.total
    assert result.outcome.winner is not None, "what was found before the budget ran out still counts"


def test_an_agent_that_fails_on_the_seed_stops_the_run_with_its_last_words(
        tmp_path: Path, policy: ScriptedLLMServer, failing_transitions: Path, registry: Registry,
        optimizer: StartOptimizer) -> None:
    server = optimizer(OptimizerScript([prompt_block(EXACT_PROMPT)]))
    crash = ("python", "-c", "import sys; sys.exit('no such task file: ' + sys.argv[2])")
    config = apo_config(tmp_path, failing_transitions, server.base_url, policy.base_url, spec={"agent": crash})
    with pytest.raises(SeedEvaluationError, match=r"the agent failed on the seed prompt.*fix the agent command first: "
                                                  r"the agent exited with code 1: no such task file"):
        run_apo(config, quiet())
    assert server.chat_requests() == [], "no optimizer call without a baseline"


def test_transitions_without_a_failure_stop_the_run_before_anything_starts(
        tmp_path: Path, passing_transitions: Path, registry: Registry) -> None:
    config = apo_config(tmp_path, passing_transitions, "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    with pytest.raises(NoFailuresError, match="no failures to learn from"):
        run_apo(config, quiet())
    assert not (tmp_path / "apo").exists(), "nothing written"
