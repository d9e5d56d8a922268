"""``tracelearn apo run``: optimize an agent's system prompt from its captured failures (``tracelearn.training.apo``).

    tracelearn apo run --prompt calc-system@production --transitions ./data/transitions \\
        --agent "python examples/calc/agent.py" --tasks examples/calc/tasks_val.jsonl \\
        --optimizer-model http://127.0.0.1:8000/v1 --rounds 3 --beam 4 --branch 4 --out ./runs/apo-7

The agent's calls go to --policy-url (default: $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1, where
the calc agent calls), or to --policy MODEL served for the run. The run directory receives the tree of
candidates, one file per completed round, the summary and the best prompt; the winner, when one
beats the seed beyond noise, is published as ``candidate`` and gated. Running the same command again
resumes after the last completed round (also after Ctrl-C). Transitions without a failure to learn
from stop the run cleanly (exit 0, nothing written). Other errors are one line, exit 1. The library
(and its web stack) is imported inside the command, so ``tracelearn --help`` stays fast.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import click
from rich.console import Console


@click.group()
def apo() -> None:
    """Automatic prompt optimization: better system prompts from captured failures."""


@apo.command("run")
@click.option("--prompt", "prompt_ref", required=True, metavar="NAME@ALIAS",
              help="The registry prompt to improve (the seed), e.g. calc-system@production.")
@click.option("--registry", "registry_location", default=None, metavar="LOCATION",
              help="Registry holding the prompt; the winner is published there (default: $TRACELEARN_REGISTRY).")
@click.option("--transitions", "transitions_path", required=True, type=click.Path(path_type=Path),
              help="Transitions to learn from: a build output root or its transitions/ folder.")
@click.option("--config-hash", default=None, help="Pipeline config hash prefix, when several were built.")
@click.option("--failure-threshold", type=float, default=None,
              help="A rollout whose reward is below this is a failure (default: --threshold).")
@click.option("--failures", "failures_per_critique", type=click.IntRange(min=1), default=4, show_default=True,
              help="Failed rollouts the optimizer sees per critique (a seeded sample).")
@click.option("--agent", "agent_text", required=True,
              help="Agent command, e.g. 'python examples/calc/agent.py'; as for tracelearn eval.")
@click.option("--tasks", "tasks_path", type=click.Path(path_type=Path), required=True,
              help="Validation tasks (JSONL), the same for every candidate (e.g. examples/calc/tasks_val.jsonl).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N tasks.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True, help="Runs per task.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Passed to the agent (same draws for every candidate); also seeds failure sampling.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="pipeline.yaml whose reward function scores every rollout (e.g. examples/calc/pipeline.yaml).")
@click.option("--threshold", type=float, default=1.0, show_default=True,
              help="A rollout succeeds when its reward is at least this.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True,
              help="Tasks in flight (the agent's {concurrency} placeholder).")
@click.option("--agent-timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0, show_default=True,
              help="Seconds before a hung agent is killed (its rollouts count as failures).")
@click.option("--policy-url", default=None,
              help="The running server the agent's calls go to (vLLM, tracelearn serve); default: $OPENAI_BASE_URL, "
                   "else http://127.0.0.1:8000/v1.")
@click.option("--policy-name", default=None, help="Which model of --policy-url (default: its only one).")
@click.option("--policy", "policy_model", default=None,
              help="Or a model served for the run with tracelearn serve: smollm2, a directory, registry:NAME@ALIAS.")
@click.option("--inject", "injection", type=click.Choice(["gateway", "registry"]), default="gateway",
              show_default=True,
              help="How a candidate reaches the agent: the gateway replaces its system message (any agent), or "
                   "tracelearn.prompt(NAME) resolves to it (an agent that fills template variables).")
@click.option("--optimizer-model", "optimizer_url", required=True, metavar="URL",
              help="OpenAI-compatible base URL of the optimizer LLM, e.g. http://127.0.0.1:8000/v1.")
@click.option("--optimizer-name", default=None, help="The optimizer model's name (default: the endpoint's only one).")
@click.option("--optimizer-api-key", default="not-needed", envvar="OPENAI_API_KEY", show_envvar=True,
              help="API key of the optimizer endpoint.")
@click.option("--optimizer-temperature", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--optimizer-max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Token limit of each optimizer reply.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Rounds of edits.")
@click.option("--beam", type=click.IntRange(min=1), default=4, show_default=True, help="Prompts kept per round.")
@click.option("--branch", type=click.IntRange(min=1), default=4, show_default=True, help="Edits per kept prompt.")
@click.option("--max-optimizer-tokens", type=click.IntRange(min=1), default=None,
              help="Stop before the next proposal once the optimizer used this many tokens.")
@click.option("--max-rollouts", type=click.IntRange(min=1), default=None,
              help="Stop before an evaluation that would run more rollouts than this in all.")
@click.option("--gate-tasks", "gate_tasks_path", type=click.Path(path_type=Path), default=None,
              help="Held-out tasks the gate evaluates the winner and production on (default: the validation "
                   "rollouts, which also chose the winner: an optimistic estimate).")
@click.option("--margin", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Success-rate points (a fraction) the winner must gain over production to be promoted.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/apo-<time>); the same one resumes a run.")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None,
              help="Evaluation cache, shareable between runs (default: <out>/cache).")
@click.option("--restart", is_flag=True, help="Start the run in --out over (its cache is kept).")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json on stdout (progress on stderr).")
def run_command(prompt_ref: str, registry_location: str | None, transitions_path: Path, config_hash: str | None,
                failure_threshold: float | None, failures_per_critique: int, agent_text: str,
                tasks_path: Path, limit: int | None, samples: int, seed: int, config_path: Path, threshold: float,
                concurrency: int, agent_timeout: float, policy_url: str | None, policy_name: str | None,
                policy_model: str | None, injection: str, optimizer_url: str, optimizer_name: str | None,
                optimizer_api_key: str, optimizer_temperature: float, optimizer_max_tokens: int, rounds: int,
                beam: int, branch: int, max_optimizer_tokens: int | None, max_rollouts: int | None,
                gate_tasks_path: Path | None, margin: float, out: Path | None, cache_path: Path | None,
                restart: bool, as_json: bool) -> None:
    """Improve the --prompt by critique-and-edit rounds, scored on the validation tasks by real rollouts."""
    from tracelearn.pipelines.config import PipelineConfigError
    from tracelearn.registry import RegistryError
    from tracelearn.schemas.dataset import DatasetError
    from tracelearn.training.apo import (
        ApoConfig,
        NoFailuresError,
        OptimizerError,
        PromptNotSubstitutedError,
        ResumeConflictError,
        SearchSettings,
        SeedEvaluationError,
        TemplateError,
        run_apo,
    )
    from tracelearn.training.eval_inputs import EvalSpec, EvaluationError

    user_errors = (RegistryError, TemplateError, DatasetError, EvaluationError, PipelineConfigError, OptimizerError,
                   ResumeConflictError, SeedEvaluationError, PromptNotSubstitutedError, ValueError)
    console = Console(stderr=as_json)
    try:
        agent = shlex.split(agent_text)
    except ValueError as error:
        raise click.ClickException(f"--agent: cannot split {agent_text!r} into words ({error})") from None
    run_directory = out or Path("runs") / time.strftime("apo-%Y%m%d-%H%M%S")
    try:
        config = ApoConfig(
            prompt=prompt_ref, transitions=transitions_path, optimizer_url=optimizer_url, out=run_directory,
            spec=EvalSpec(agent=tuple(agent), tasks=tasks_path, samples=samples, seed=seed, limit=limit,
                          pipeline_config=config_path, success_threshold=threshold, concurrency=concurrency,
                          agent_timeout_s=agent_timeout, service_name="tracelearn-apo"),
            search=SearchSettings(rounds=rounds, beam=beam, branch=branch, failures_per_critique=failures_per_critique,
                                  seed=seed, max_optimizer_tokens=max_optimizer_tokens, max_rollouts=max_rollouts),
            policy_url=policy_url, policy_name=policy_name, policy_model=policy_model, injection=injection,
            optimizer_name=optimizer_name, optimizer_api_key=optimizer_api_key,
            optimizer_temperature=optimizer_temperature, optimizer_max_tokens=optimizer_max_tokens,
            failure_threshold=failure_threshold, config_hash=config_hash, registry=registry_location,
            cache=cache_path, gate_tasks=gate_tasks_path, margin=margin, restart=restart)
        result = run_apo(config, console)
    except NoFailuresError as error:
        # Nothing to learn from is an outcome, not a fault: the prompt stays as it is.
        console.print(f"nothing to optimize: {error}", highlight=False)
        if as_json:
            click.echo(json.dumps({"stop": "no_failures", "stop_reason": str(error)}, indent=2))
        return
    except user_errors as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted; run the same command again to resume {run_directory} after its last completed "
                   "round", err=True)
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
