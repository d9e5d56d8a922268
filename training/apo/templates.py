"""Prompt templates: which ``{name}`` variables a prompt holds, and whether an edit kept them.

The syntax is Python's ``str.format`` without its extensions: ``{name}`` (an identifier) is a
variable, ``{{`` and ``}}`` are literal braces, and any other brace is an error, so a prompt that an
agent fills with ``prompt.format(**values)`` parses here exactly as it will there. APO rejects a
candidate whose variables differ from its parent's: an agent filling ``{question}`` breaks on a
prompt that lost it, and a variable the optimizer invented is one no agent fills.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import re

__all__ = ["TemplateError", "VariableMismatchError", "check_variables_kept", "template_variables"]

_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ValueError):
    """A prompt whose braces are not template syntax; the message names the line and column."""


class VariableMismatchError(ValueError):
    """An edited prompt that dropped or invented template variables (``dropped``, ``invented``)."""

    def __init__(self, dropped: frozenset[str], invented: frozenset[str]) -> None:
        self.dropped = dropped
        self.invented = invented
        parts = []
        if dropped:
            parts.append("dropped " + ", ".join(f"{{{name}}}" for name in sorted(dropped)))
        if invented:
            parts.append("invented " + ", ".join(f"{{{name}}}" for name in sorted(invented)))
        super().__init__("the edit " + " and ".join(parts)
                         + "; every template variable of the parent must stay, and no other")


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def template_variables(text: str, source: str = "prompt") -> frozenset[str]:
    """The names of the ``{name}`` variables in ``text``.

    Raises :class:`TemplateError` naming ``source`` and the position of the first brace that is
    neither a variable nor an escaped ``{{`` / ``}}``.
    """
    names: set[str] = set()
    index = 0
    while index < len(text):
        character = text[index]
        if character not in "{}":
            index += 1
            continue
        if text.startswith(character * 2, index):
            index += 2
            continue
        if character == "}":
            raise TemplateError(f"{source}: {_position(text, index)}: a '}}' that closes nothing; "
                                "write '}}' for a literal brace")
        end = text.find("}", index + 1)
        if end == -1:
            raise TemplateError(f"{source}: {_position(text, index)}: a '{{' that is never closed; "
                                "write '{{' for a literal brace")
        name = text[index + 1:end]
        if not _VARIABLE.fullmatch(name):
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise TemplateError(f"{source}: {_position(text, index)}: '{{{shown}}}' is not a variable name; "
                                "variables are {identifier}, and literal braces are written '{{' and '}}'")
        names.add(name)
        index = end + 1
    return frozenset(names)


def check_variables_kept(parent: frozenset[str], edited: str, source: str = "edited prompt") -> None:
    """Raise :class:`VariableMismatchError` unless ``edited`` has exactly the variables ``parent`` has
    (and :class:`TemplateError` when its braces do not parse)."""
    variables = template_variables(edited, source)
    if variables != parent:
        raise VariableMismatchError(dropped=parent - variables, invented=variables - parent)
