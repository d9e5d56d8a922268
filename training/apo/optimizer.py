"""The optimizer LLM: a textual gradient (a critique of the prompt from failures) and its application (an edit).

One proposal is two chat calls to any OpenAI-compatible endpoint (a hosted model, vLLM, ``tracelearn
serve``), made with the ``openai`` client, in the style of ProTeGi / TextGrad as Agent Lightning's APO
uses them:

1. **critique**: the current prompt and a sample of failed runs go in; a short list of reasons the
   prompt led to those failures, and what it should say instead, comes out;
2. **edit**: the prompt and the critique go in; the improved prompt comes out between ``<prompt>``
   and ``</prompt>``, the only part of the reply that is used.

Each request follows one worked example of it (an unrelated translation agent), which small
optimizers need to keep to the format.

A reply that cannot be used is not an error of the run: the proposal comes back with a
:class:`~tracelearn.training.apo.candidates.Rejection` (``empty_critique``, ``empty_edit``,
``malformed_edit``, or ``optimizer_error`` for a call the endpoint failed after the client's retries),
and the search counts it and goes on. Every call's ``usage`` is added up (calls without one are
counted), and every call is a span (``optimizer_spans``). Requests carry a seed derived from the
proposal, so an endpoint that honours ``seed`` gives a resumed run the same edits.

May import: openai, tracelearn.training.apo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import openai
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from tracelearn.training.apo.candidates import Rejection, TokenUsage
from tracelearn.training.apo.failures import Failure, render_failures
from tracelearn.training.apo.optimizer_spans import llm_call_attributes

__all__ = [
    "OptimizerError",
    "OptimizerModel",
    "OptimizerReply",
    "Proposal",
    "critique_messages",
    "edit_messages",
    "parse_critique",
    "parse_edited_prompt",
    "resolve_optimizer_model",
]

SYSTEM_MESSAGE = ("You are an expert prompt engineer. You improve the system prompt of an AI agent from runs "
                  "where the agent failed.")
_PROMPT_BLOCK = re.compile(r"<prompt>(.*?)</prompt>", re.DOTALL | re.IGNORECASE)
_PROMPT_OPEN = re.compile(r"<prompt>", re.IGNORECASE)


class OptimizerError(RuntimeError):
    """The optimizer endpoint cannot be used at all (unreachable, or no such model); names the URL."""


@dataclass(frozen=True)
class OptimizerReply:
    """One chat call's text, why it stopped, and its tokens."""

    text: str
    finish_reason: str | None
    usage: TokenUsage


@dataclass(frozen=True)
class Proposal:
    """An edit proposed for a parent prompt: the critique, the edited prompt (``None`` when rejected),
    the rejection, the failures the critique saw (rollout ids) and the tokens both calls cost."""

    critique: str | None
    prompt: str | None
    rejection: Rejection | None
    failures: tuple[str, ...]
    usage: TokenUsage


# --- Requests and their parsing ---------------------------------------------------------------------


# One worked example goes before each request: a small optimizer (the embedded 135M model) keeps to a
# format it has seen answered far better than to one it is only told about (measured: without it,
# none of its edits closed their <prompt> block), and a large one loses nothing by it. The example's
# task is unrelated to any agent's, so it suggests the shape of an answer, not its content.
_EXAMPLE_PROMPT = "Translate the user's text to French."
_EXAMPLE_FAILURES = (Failure(
    rollout_id="example", task_id="example-1", reward=0.0, messages=({"role": "user", "content": "Good morning"},),
    response=({"role": "assistant", "content": "Sure! 'Good morning' in French is 'Bonjour'. People say it "
                                               "until the evening."},)),)
_EXAMPLE_CRITIQUE = ("1. The prompt does not say what the reply holds, so the agent explains instead of just "
                     "translating. It should say: reply with the French translation and nothing else.")
_EXAMPLE_EDIT = ("<prompt>\nTranslate the user's text to French. Reply with the French translation only, "
                 "without explanations.\n</prompt>")


def _critique_request(prompt: str, failures: tuple[Failure, ...], threshold: float) -> str:
    return (f"The agent's system prompt:\n<prompt>\n{prompt}\n</prompt>\n\n"
            f"Runs where the agent failed (reward below {threshold:g}):\n\n{render_failures(failures)}\n\n"
            "Give up to three reasons why this prompt led to these failures and, for each, what the prompt "
            "should say instead. Be concrete and brief.")


def _edit_request(prompt: str, critique: str, variables: frozenset[str]) -> str:
    if variables:
        keep = ("Keep the placeholders " + ", ".join(f"{{{name}}}" for name in sorted(variables))
                + " exactly as written (the agent fills them in) and add no other placeholder in curly braces.")
    else:
        keep = "Do not add placeholders in curly braces."
    return (f"The agent's system prompt:\n<prompt>\n{prompt}\n</prompt>\n\n"
            f"A review of it:\n<critique>\n{critique}\n</critique>\n\n"
            f"Write an improved system prompt that fixes what the review points out. {keep} "
            "Reply with the new prompt between <prompt> and </prompt>, and nothing else.")


def critique_messages(prompt: str, failures: tuple[Failure, ...], threshold: float) -> list[dict[str, str]]:
    """The critique request (the prompt, the failed runs, what to answer) after its worked example."""
    return [{"role": "system", "content": SYSTEM_MESSAGE},
            {"role": "user", "content": _critique_request(_EXAMPLE_PROMPT, _EXAMPLE_FAILURES, 1.0)},
            {"role": "assistant", "content": _EXAMPLE_CRITIQUE},
            {"role": "user", "content": _critique_request(prompt, failures, threshold)}]


def edit_messages(prompt: str, critique: str, variables: frozenset[str]) -> list[dict[str, str]]:
    """The edit request (the prompt, the critique, how to keep the template variables, the reply format)
    after its worked example."""
    return [{"role": "system", "content": SYSTEM_MESSAGE},
            {"role": "user", "content": _edit_request(_EXAMPLE_PROMPT, _EXAMPLE_CRITIQUE, frozenset())},
            {"role": "assistant", "content": _EXAMPLE_EDIT},
            {"role": "user", "content": _edit_request(prompt, critique, variables)}]


def parse_critique(reply: OptimizerReply) -> str | Rejection:
    text = reply.text.strip()
    return text if text else Rejection("empty_critique", "the optimizer returned an empty critique")


def parse_edited_prompt(reply: OptimizerReply) -> str | Rejection:
    """The text of the reply's last ``<prompt>...</prompt>`` block, or why there is none to use."""
    blocks = _PROMPT_BLOCK.findall(reply.text)
    if blocks:
        edited = str(blocks[-1]).strip()
        return edited if edited else Rejection("empty_edit", "the optimizer's <prompt> block is empty")
    if _PROMPT_OPEN.search(reply.text):
        truncated = reply.finish_reason == "length"
        hint = " (the reply hit the token limit: raise --optimizer-max-tokens)" if truncated else ""
        return Rejection("malformed_edit", f"the optimizer opened <prompt> but never closed it{hint}")
    if not reply.text.strip():
        return Rejection("empty_edit", "the optimizer returned an empty edit")
    shown = " ".join(reply.text.split())[:80]
    return Rejection("malformed_edit", f"the optimizer's edit has no <prompt>...</prompt> block: {shown!r}")


# --- The endpoint -----------------------------------------------------------------------------------


def _listed_models(client: openai.OpenAI, base_url: str) -> list[str] | None:
    """The endpoint's model ids; ``None`` when it does not implement ``/models``."""
    try:
        return [model.id for model in client.models.list()]
    except openai.NotFoundError:
        return None
    except openai.APIConnectionError as error:
        raise OptimizerError(f"no OpenAI-compatible server answers {base_url} ({error}); start it, or fix "
                             "--optimizer-model") from None
    except openai.APIStatusError as error:
        raise OptimizerError(f"{base_url}/models answered HTTP {error.status_code}: {error.message}") from None


def resolve_optimizer_model(base_url: str, model: str | None, api_key: str = "not-needed") -> str:
    """The optimizer model to use at ``base_url``: ``model``, checked against the models the endpoint lists,
    or its only model. Raises :class:`OptimizerError` naming the URL and what to do."""
    listed = _listed_models(openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=1, timeout=30.0), base_url)
    if model is None:
        if listed is None or len(listed) != 1:
            what = "does not list its models" if listed is None else f"lists {len(listed)}: {', '.join(listed)}"
            raise OptimizerError(f"{base_url} {what}; choose the optimizer with --optimizer-name")
        return listed[0]
    if listed is not None and model not in listed:
        raise OptimizerError(f"{base_url} does not serve {model!r} (it serves: {', '.join(listed) or 'none'})")
    return model


def _typed(messages: list[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    """Our system/user/assistant messages as the client's typed request messages."""
    typed: list[ChatCompletionMessageParam] = []
    for message in messages:
        if message["role"] == "system":
            typed.append({"role": "system", "content": message["content"]})
        elif message["role"] == "assistant":
            typed.append({"role": "assistant", "content": message["content"]})
        else:
            typed.append({"role": "user", "content": message["content"]})
    return typed


class OptimizerModel:
    """The optimizer endpoint and model; :meth:`propose` makes one critique-and-edit proposal."""

    def __init__(self, base_url: str, model: str, tracer: Tracer, *, api_key: str = "not-needed",
                 temperature: float = 0.7, max_tokens: int = 512, timeout_s: float = 600.0) -> None:
        self.base_url = base_url
        self.model = model
        self.tracer = tracer
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2)

    def chat(self, messages: list[dict[str, str]], seed: int, step: str) -> OptimizerReply:
        """One traced chat call (``step`` names it on the span); raises ``openai.APIError`` when it fails."""
        with self.tracer.start_as_current_span(f"chat {self.model}", kind=SpanKind.CLIENT,
                                               attributes={"tracelearn.apo.step": step}) as span:
            response = self.client.chat.completions.create(model=self.model, messages=_typed(messages),
                                                           temperature=self.temperature, max_tokens=self.max_tokens,
                                                           seed=seed)
            choice = response.choices[0] if response.choices else None
            text = (choice.message.content or "") if choice is not None else ""
            finish = choice.finish_reason if choice is not None else None
            usage = response.usage
            tokens = (TokenUsage(calls=1, calls_without_usage=1) if usage is None
                      else TokenUsage(usage.prompt_tokens, usage.completion_tokens, calls=1))
            span.set_attributes(llm_call_attributes(
                self.model, messages, text, finish, response.model,
                None if usage is None else usage.prompt_tokens, None if usage is None else usage.completion_tokens))
            return OptimizerReply(text, finish, tokens)

    def propose(self, prompt: str, variables: frozenset[str], failures: tuple[Failure, ...], threshold: float,
                seed: int, attributes: Mapping[str, str]) -> Proposal:
        """Critique ``prompt`` from ``failures``, then apply the critique; see the module docstring."""
        seen = tuple(failure.rollout_id for failure in failures)
        usage = TokenUsage()
        with self.tracer.start_as_current_span("apo.propose", attributes=dict(attributes)) as span:
            try:
                reply = self.chat(critique_messages(prompt, failures, threshold), seed, "critique")
                usage += reply.usage
                critique = parse_critique(reply)
                if isinstance(critique, Rejection):
                    return Proposal(None, None, critique, seen, usage)
                reply = self.chat(edit_messages(prompt, critique, variables), seed + 1, "edit")
                usage += reply.usage
            except openai.APIError as error:
                span.set_status(Status(StatusCode.ERROR, str(error)))
                rejection = Rejection("optimizer_error", f"the optimizer call failed: {type(error).__name__}: {error}")
                return Proposal(None, None, rejection, seen, usage + TokenUsage(calls=1, calls_without_usage=1))
            edited = parse_edited_prompt(reply)
            if isinstance(edited, Rejection):
                return Proposal(critique, None, edited, seen, usage)
            return Proposal(critique, edited, None, seen, usage)
