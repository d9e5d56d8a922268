"""Template variables: what a prompt holds, and the checks that reject an edit that changed them."""

import pytest

from tracelearn.training.apo.candidates import validate_edit
from tracelearn.training.apo.templates import TemplateError, template_variables

PARENT = "Answer {question} for {user}. Reply as JSON: {{\"answer\": 1}}."
VARIABLES = frozenset({"question", "user"})


def test_variables_are_the_names_in_single_braces_and_doubled_braces_are_text() -> None:
    assert template_variables(PARENT) == VARIABLES
    assert template_variables("no variables, {{just}} braces") == frozenset()
    assert template_variables("{a}{a} and {_b2}") == frozenset({"a", "_b2"})


@pytest.mark.parametrize(("text", "message"), [
    ("Reply with {answer", "line 1, column 12: a '{' that is never closed"),
    ("Reply.\nThen } stop", "line 2, column 6: a '}' that closes nothing"),
    ("Reply as {\"answer\": 1}", "'{\"answer\": 1}' is not a variable name"),
    ("Use {0} here", "'{0}' is not a variable name"),
    ("Say {name!r}", "'{name!r}' is not a variable name"),
])
def test_unbalanced_or_foreign_braces_are_refused_naming_where(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=f"my prompt: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        template_variables(text, "my prompt")


def test_an_edit_that_keeps_every_variable_and_changes_the_text_passes() -> None:
    assert validate_edit(PARENT, VARIABLES, "Answer {question} for {user} exactly. JSON: {{\"answer\": 1}}.") is None


@pytest.mark.parametrize(("edited", "kind", "message"), [
    ("Answer the question for {user}.", "variables_changed", "dropped {question}"),
    ("Answer {question} for {user} in {language}.", "variables_changed", "invented {language}"),
    ("Answer {query} for {user}.", "variables_changed", "dropped {question} and invented {query}"),
    ("Answer {question} for {user}. Reply as JSON: {\"answer\": 1}.", "unbalanced_braces", "is not a variable name"),
    ("Answer {question} for {user", "unbalanced_braces", "never closed"),
    (f"  {PARENT}\n", "unchanged", "the parent prompt again"),
])
def test_an_edit_that_changes_the_variables_or_nothing_is_rejected(edited: str, kind: str, message: str) -> None:
    rejection = validate_edit(PARENT, VARIABLES, edited)
    assert rejection is not None and rejection.kind == kind
    assert message in rejection.message
