"""Automatic prompt optimization (APO): better system prompts from captured failures, measured by real rollouts.

Textual gradients with beam search, the ProTeGi / TextGrad family Agent Lightning's APO uses: an
optimizer LLM critiques the current prompt from low-reward rollouts of the transitions dataset and
applies its critique as an edit; every edit that keeps the prompt's template variables is scored by
running the agent on validation tasks with that prompt injected (the gateway's prompt substitution,
or ``tracelearn.prompt`` pinned to it), the same tasks and seeds for all; the best ``beam`` prompts
go on to the next round, and the best candidate whose paired 95% interval against the seed lies
above 0 is published as ``candidate`` with its lineage and gated like a checkpoint.

- ``templates``: ``{name}`` variables, ``{{``/``}}`` escapes, the check that an edit kept them.
- ``failures``: low-reward rollouts of a transitions dataset, seeded samples, rendered as text.
- ``optimizer`` / ``optimizer_spans``: the critique and edit calls to any OpenAI-compatible endpoint,
  their parsing, their token counts and their spans.
- ``candidates``: the tree's records, the edit checks, the paired rule and the winner.
- ``evaluation``: a candidate scored by real rollouts, cached by prompt, task, sample, seed.
- ``search``: the rounds of the beam search, budgets, resumption; ``run_files``: the run directory.
- ``promotion``: the winner published with its lineage and gated; ``run``: one run end to end.

Docs: docs/apo.md.

May import: tracelearn.training.evaluate (and its eval_* parts) and .gate, tracelearn.pipelines, tracelearn.registry,
tracelearn.storage, tracelearn.collector and tracelearn.instrumentation (the optimizer's spans),
tracelearn.processes (the gateway that puts a candidate in front of the agent, ``tracelearn gateway`` as
a process), openai, polars, rich. Must never import tracelearn.serving, torch or airflow: the policy and
the gateway are servers, started as processes when needed.
"""

from tracelearn.training.apo.candidates import Candidate, Rejection, Score, TokenUsage, choose_winner
from tracelearn.training.apo.evaluation import CandidateEvaluation, PromptEvaluator, PromptNotSubstitutedError
from tracelearn.training.apo.failures import Failure, FailurePool, NoFailuresError, load_failures, sample_failures
from tracelearn.training.apo.optimizer import OptimizerError, OptimizerModel, Proposal, resolve_optimizer_model
from tracelearn.training.apo.run import ApoConfig, ApoInputs, ApoResult, InjectionError, check_inputs, run_apo
from tracelearn.training.apo.run_files import ResumeConflictError, RunFiles
from tracelearn.training.apo.search import SearchOutcome, SearchSettings, SeedEvaluationError, beam_search
from tracelearn.training.apo.templates import TemplateError, VariableMismatchError, template_variables

__all__ = [
    "ApoConfig",
    "ApoInputs",
    "ApoResult",
    "Candidate",
    "CandidateEvaluation",
    "Failure",
    "FailurePool",
    "InjectionError",
    "NoFailuresError",
    "OptimizerError",
    "OptimizerModel",
    "PromptEvaluator",
    "PromptNotSubstitutedError",
    "Proposal",
    "Rejection",
    "ResumeConflictError",
    "RunFiles",
    "Score",
    "SearchOutcome",
    "SearchSettings",
    "SeedEvaluationError",
    "TemplateError",
    "TokenUsage",
    "VariableMismatchError",
    "beam_search",
    "check_inputs",
    "choose_winner",
    "load_failures",
    "resolve_optimizer_model",
    "run_apo",
    "sample_failures",
    "template_variables",
]
