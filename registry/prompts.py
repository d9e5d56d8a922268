"""``tracelearn.prompt``: what an agent calls to read a prompt by alias instead of hard-coding it.

The text is cached per (registry, name, alias) and the alias is re-read at most every
``refresh_seconds``, so promoting a new prompt version reaches running agents within that interval
without a restart, and a hot loop of calls costs a dictionary lookup. When the registry cannot be
read after a version was loaded, the cached text keeps being served (an agent never fails because
the registry blinked) and the failure is logged once.

``TRACELEARN_PROMPTS`` pins references for one run without code changes, for example
``calc-system=calc-system@candidate,other=other@7``: ``prompt("calc-system")`` then resolves
``calc-system@candidate``. Evaluation and prompt optimization run agents this way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from tracelearn.registry.artifacts import DEFAULT_ALIAS, ArtifactRef, InvalidReferenceError, RegistryError
from tracelearn.registry.backend import Registry, default_registry_location, open_registry
from tracelearn.settings.variables import PROMPTS

PROMPTS_ENV = PROMPTS.name
DEFAULT_REFRESH_SECONDS = 5.0

_logger = logging.getLogger(__name__)


@dataclass
class _CachedPrompt:
    reference: str  # name@version actually loaded
    text: str
    checked_at: float
    failure_logged: bool = False


_cache: dict[tuple[str, str], _CachedPrompt] = {}
_registries: dict[str, Registry] = {}
_lock = threading.Lock()


def pinned_references(value: str | None = None) -> dict[str, str]:
    """Parse ``TRACELEARN_PROMPTS`` (``name=ref,name=ref``) into name -> reference."""
    raw = (PROMPTS.text() or "") if value is None else value
    pins: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, separator, reference = item.partition("=")
        if not separator or not name.strip() or not reference.strip():
            raise InvalidReferenceError(
                f"{PROMPTS_ENV}: {item!r} is not NAME=REFERENCE (e.g. calc-system=calc-system@7)"
            )
        ArtifactRef.parse(reference.strip())
        pins[name.strip()] = reference.strip()
    return pins


def prompt(name: str, alias: str = DEFAULT_ALIAS, *, registry: str | None = None,
           refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> str:
    """The text of prompt ``name`` at ``alias`` (default ``production``) in the registry.

    ``registry`` is a location (default ``$TRACELEARN_REGISTRY``). A pin in ``TRACELEARN_PROMPTS``
    overrides the alias. Raises ``RegistryError`` only when the prompt was never loaded.
    """
    reference = pinned_references().get(name, f"{name}@{alias}")
    location = registry or default_registry_location()
    key = (location, reference)
    now = time.monotonic()
    with _lock:
        cached = _cache.get(key)
        if cached is not None and now - cached.checked_at < refresh_seconds:
            return cached.text
    try:
        store = _registry_at(location)
        version = store.resolve(reference)
        if cached is not None and cached.reference == version.ref:
            text = cached.text
        else:
            text = store.read_prompt(version.ref)[1]
    except RegistryError as error:
        if cached is None:
            raise
        if not cached.failure_logged:
            _logger.warning("tracelearn: cannot refresh prompt %s (%s); serving cached %s", reference, error,
                            cached.reference)
        with _lock:
            cached.checked_at, cached.failure_logged = now, True
        return cached.text
    with _lock:
        _cache[key] = _CachedPrompt(version.ref, text, now)
    return text


def _registry_at(location: str) -> Registry:
    with _lock:
        if location not in _registries:
            _registries[location] = open_registry(location)
        return _registries[location]
