"""The optimizer against a real OpenAI-compatible server: critique and edit, replies it cannot use, its
token counts, and its own calls landing as spans in a Parquet dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support.scripted_llm_server import Reply, ScriptedError, ScriptedLLMServer, prompt_ids, tokenize

from tracelearn.pipelines.spans_input import scan_spans
from tracelearn.processes import free_port
from tracelearn.training.apo.failures import Failure
from tracelearn.training.apo.optimizer import OptimizerError, OptimizerModel, resolve_optimizer_model
from tracelearn.training.apo.optimizer_spans import OptimizerSpans

PROMPT = "Answer {question}. Reply with the number only."
FAILURES = (Failure("r1", "t1", 0.0, ({"role": "system", "content": "old"}, {"role": "user", "content": "2+2?"}),
                    ({"role": "assistant", "content": "Four-ish, maybe 5"},)),)


def replies(critique: str, edit: str) -> Any:
    def script(body: dict[str, Any]) -> Reply:
        return Reply(text=edit if "<critique>" in body["messages"][-1]["content"] else critique)
    return script


def propose(server: ScriptedLLMServer, spans_dir: Path, max_tokens: int = 512) -> Any:
    spans = OptimizerSpans(spans_dir)
    try:
        model = OptimizerModel(server.base_url, server.model, spans.tracer, max_tokens=max_tokens)
        return model.propose(PROMPT, frozenset({"question"}), FAILURES, 1.0, seed=7,
                             attributes={"tracelearn.apo.candidate": "r1.1"})
    finally:
        spans.close()


def test_a_proposal_is_a_critique_then_an_edit_and_both_calls_are_counted_and_traced(tmp_path: Path) -> None:
    edit = "Sure.\n<prompt>\nAnswer {question}. Reply with the exact number only.\n</prompt>"
    with ScriptedLLMServer(replies("It lets the agent hedge.", edit), model="optimizer") as server:
        proposal = propose(server, tmp_path / "spans")
        critique_request, edit_request = server.chat_requests()

    assert proposal.rejection is None
    assert proposal.critique == "It lets the agent hedge."
    assert proposal.prompt == "Answer {question}. Reply with the exact number only."
    assert proposal.failures == ("r1",)
    # What the optimizer saw: the prompt, the failed run without its old system message, the reply and reward.
    assert PROMPT in critique_request["messages"][-1]["content"]
    assert "user: 2+2?" in critique_request["messages"][-1]["content"]
    assert "agent's final reply: Four-ish, maybe 5" in critique_request["messages"][-1]["content"]
    assert "old" not in critique_request["messages"][-1]["content"]
    assert "Keep the placeholders {question} exactly" in edit_request["messages"][-1]["content"]
    # Each request follows a worked example of it (small optimizers keep to a format they have seen).
    assert [m["role"] for m in critique_request["messages"]] == ["system", "user", "assistant", "user"]
    assert edit_request["messages"][2]["content"].startswith("<prompt>")
    assert (critique_request["seed"], edit_request["seed"]) == (7, 8)
    # Tokens as the endpoint reported them (the scripted server counts bytes).
    prompt_tokens = len(prompt_ids(critique_request["messages"])) + len(prompt_ids(edit_request["messages"]))
    completion_tokens = len(tokenize("It lets the agent hedge.")) + len(tokenize(edit))
    assert (proposal.usage.prompt_tokens, proposal.usage.completion_tokens, proposal.usage.calls) == (
        prompt_tokens, completion_tokens, 2)

    spans = scan_spans(tmp_path / "spans").collect()
    assert sorted(spans["name"].to_list()) == ["apo.propose", "chat optimizer", "chat optimizer"]
    calls = spans.filter(pl.col("name") == "chat optimizer")
    assert calls["input_tokens"].sum() + calls["output_tokens"].sum() == proposal.usage.total
    assert set(calls["service"].to_list()) == {"tracelearn-apo-optimizer"}
    root = spans.filter(pl.col("name") == "apo.propose").row(0, named=True)
    assert set(calls["parent_span_id"].to_list()) == {root["span_id"]}


@pytest.mark.parametrize(("critique", "edit", "kind", "message"), [
    ("  ", "unused", "empty_critique", "empty critique"),
    ("fine", "", "empty_edit", "returned an empty edit"),
    ("fine", "<prompt>\n \n</prompt>", "empty_edit", "<prompt> block is empty"),
    ("fine", "Make it say 'exact'.", "malformed_edit", "no <prompt>...</prompt> block: \"Make it say 'exact'.\""),
    ("fine", "<prompt>Answer {question} and never close the tag", "malformed_edit", "never closed it"),
])
def test_a_reply_that_cannot_be_used_is_a_rejection_not_an_error(tmp_path: Path, critique: str, edit: str,
                                                                 kind: str, message: str) -> None:
    with ScriptedLLMServer(replies(critique, edit), model="optimizer") as server:
        proposal = propose(server, tmp_path / "spans")
        calls = len(server.chat_requests())
    assert proposal.prompt is None and proposal.rejection is not None
    assert proposal.rejection.kind == kind and message in proposal.rejection.message
    assert calls == (1 if kind == "empty_critique" else 2), "no edit is asked for without a critique"
    assert proposal.usage.calls == calls


def test_an_edit_cut_by_the_token_limit_says_which_flag_to_raise(tmp_path: Path) -> None:
    with ScriptedLLMServer(replies("fine", "<prompt>" + "Answer {question} carefully. " * 20 + "</prompt>"),
                           model="optimizer") as server:
        proposal = propose(server, tmp_path / "spans", max_tokens=40)
    assert proposal.rejection is not None and proposal.rejection.kind == "malformed_edit"
    assert "hit the token limit: raise --optimizer-max-tokens" in proposal.rejection.message


def test_an_endpoint_that_fails_the_call_is_an_optimizer_error_rejection(tmp_path: Path) -> None:
    def failing(body: dict[str, Any]) -> Reply:
        raise ScriptedError(400, "This model's maximum context length is 2048 tokens")

    with ScriptedLLMServer(failing, model="optimizer") as server:
        proposal = propose(server, tmp_path / "spans")
    assert proposal.rejection is not None and proposal.rejection.kind == "optimizer_error"
    assert "maximum context length is 2048 tokens" in proposal.rejection.message
    assert proposal.usage.calls_without_usage == 1
    spans = scan_spans(tmp_path / "spans").collect()
    assert spans.filter(pl.col("name") == "apo.propose")["status_code"].to_list() == ["ERROR"]


def test_the_optimizer_model_is_checked_against_what_the_endpoint_serves() -> None:
    with ScriptedLLMServer(model="optimizer") as server:
        assert resolve_optimizer_model(server.base_url, None) == "optimizer"
        assert resolve_optimizer_model(server.base_url, "optimizer") == "optimizer"
        with pytest.raises(OptimizerError, match=r"does not serve 'gpt-9' \(it serves: optimizer\)"):
            resolve_optimizer_model(server.base_url, "gpt-9")
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(OptimizerError, match=f"no OpenAI-compatible server answers {nobody}"):
        resolve_optimizer_model(nobody, None)
