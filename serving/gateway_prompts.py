"""Prompt substitution in the gateway: rules (``[MODEL=]REF``), registry prompts followed by alias, and the
replacement of a request's leading system message.

A request is substituted when its first message is a system (or developer) message and its ``model``
matches the rule's (a rule without a model matches every request); requests without a system message
are never given one. A prompt is re-read when its alias moves (``PromptSource`` polls the registry).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tracelearn.registry import ArtifactVersion, Registry

_SYSTEM_ROLES: Final = frozenset({"system", "developer"})

_log = logging.getLogger(__name__)


class GatewayConfigError(ValueError):
    """A gateway setting that cannot work (bad upstream URL, bad prompt rule, missing prompt)."""


@dataclass(frozen=True)
class PromptRule:
    """Replace the system message of requests for ``model`` (``None``: every model) by ``reference``."""

    reference: str
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> PromptRule:
        """``REF`` or ``MODEL=REF`` (``calc-system@production``, ``calc-policy=calc-system@production``)."""
        model, separator, reference = text.strip().rpartition("=")
        if not reference or (separator and not model):
            raise GatewayConfigError(
                f"prompt substitution {text!r}: write REF or MODEL=REF, e.g. calc-system@production"
            )
        return cls(reference=reference, model=model or None)

    def matches(self, model: Any) -> bool:
        return self.model is None or self.model == model


@dataclass(frozen=True)
class SubstitutedPrompt:
    version: ArtifactVersion
    text: str


class PromptSource:
    """One registry prompt reference, cached; ``refresh`` re-reads the text only when the alias moved.

    ``start`` polls every ``poll_seconds`` on a daemon thread; a failed poll is logged (once per
    kind of failure) and the last good prompt stays in use.
    """

    def __init__(self, registry: Registry, rule: PromptRule, poll_seconds: float = 5.0) -> None:
        self.registry = registry
        self.rule = rule
        self.poll_seconds = poll_seconds
        self._current: SubstitutedPrompt | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: set[str] = set()

    @property
    def current(self) -> SubstitutedPrompt:
        if self._current is None:
            self.refresh()
        assert self._current is not None
        return self._current

    def refresh(self) -> bool:
        """Resolve the reference now; returns whether the substituted version changed."""
        version = self.registry.resolve(self.rule.reference)
        held = self._current
        if held is not None and held.version.name == version.name and held.version.version == version.version:
            return False
        version, text = self.registry.read_prompt(version.ref)
        self._current = SubstitutedPrompt(version, text)
        if held is not None:
            _log.info("gateway: %s now substitutes %s (was %s)", self.rule.reference, version.ref, held.version.ref)
        return True

    def start(self) -> PromptSource:
        self.refresh()  # fail at startup, with the registry's message, not on the first request
        self._thread = threading.Thread(target=self._poll, name="tracelearn-gateway-prompt", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception as error:
                kind = type(error).__name__
                level = logging.DEBUG if kind in self._failures else logging.WARNING
                self._failures.add(kind)
                _log.log(level, "gateway: cannot refresh prompt %s (%s); keeping %s", self.rule.reference, error,
                         self._current.version.ref if self._current else "none")


def substitute_system_prompt(body: dict[str, Any], text: str) -> bool:
    """Replace the content of ``body``'s leading system/developer message by ``text``; whether it did."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    first = messages[0]
    if not isinstance(first, dict) or first.get("role") not in _SYSTEM_ROLES:
        return False
    messages[0] = {**first, "content": text}
    return True
