"""The model an evaluation measures, answering at an OpenAI-compatible URL for the evaluation's duration.

:func:`pinned_model` pins a ``registry:NAME@ALIAS`` reference to the version it names, so an alias
that moves during the evaluation cannot change what is measured. :func:`served_model` starts
``tracelearn serve`` for the block (its log in ``workdir/server.log``), or checks that an already
running server at ``base_url`` lists the model; :func:`model_cards` reads a server's ``/v1/models``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tracelearn.processes import ChildProcessError, console_script, free_port, start_child
from tracelearn.registry import DEFAULT_ALIAS, REGISTRY_ENV, ArtifactRef, RegistryError, open_registry
from tracelearn.training.eval_inputs import ModelServerError, UnknownModelError

__all__ = ["REGISTRY_PREFIX", "ServedModel", "model_cards", "pinned_model", "served_model"]

REGISTRY_PREFIX = "registry:"


def pinned_model(model: str, registry: str | None) -> tuple[str, str | None]:
    """``model`` as the server gets it, and the registry version it names (``None`` for a path or name).

    ``registry:NAME@ALIAS`` becomes ``registry:NAME@N`` (``registry:NAME`` means ``@production``);
    anything else must resolve with ``tracelearn.models.resolve_model``. Raises
    :class:`UnknownModelError` saying what is missing.
    """
    if model.startswith(REGISTRY_PREFIX):
        location = registry or os.environ.get(REGISTRY_ENV)
        try:
            ref = ArtifactRef.parse(model.removeprefix(REGISTRY_PREFIX), default_alias=DEFAULT_ALIAS)
            version = open_registry(location).resolve(ref)
        except RegistryError as error:
            raise UnknownModelError(f"{model}: {error}") from None
        if version.kind != "checkpoint":
            raise UnknownModelError(f"{model} names {version.ref}, a {version.kind}, not a model checkpoint")
        return f"{REGISTRY_PREFIX}{version.ref}", version.ref
    from tracelearn.models import ModelNotFoundError, resolve_model

    try:
        resolve_model(model)
    except ModelNotFoundError as error:
        raise UnknownModelError(str(error)) from None
    return model, None



@dataclass(frozen=True)
class ServedModel:
    """A model answering at ``base_url``: the name to request and the version the server reports."""

    base_url: str
    name: str
    model_version: str | None


def model_cards(base_url: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The ``data`` of ``GET {base_url}/models``; raises :class:`ModelServerError` naming the URL."""
    url = f"{base_url.rstrip('/')}/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise ModelServerError(f"no OpenAI-compatible server answers {url}: {error}") from None
    except json.JSONDecodeError:
        raise ModelServerError(
            f"{url} answered something other than JSON; is it an OpenAI-compatible server?"
        ) from None
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list) or not all(isinstance(card, dict) and "id" in card for card in cards):
        raise ModelServerError(f"{url} did not answer an OpenAI model list ({{'data': [{{'id': ...}}]}})")
    return cards


def _models_answer(base_url: str) -> bool | None:
    """``True`` once ``{base_url}/models`` answers a model list, else ``None`` (the readiness probe)."""
    try:
        model_cards(base_url, timeout_s=2.0)
    except ModelServerError:
        return None
    return True


@contextmanager
def served_model(model: str, workdir: Path, timeout_s: float, console: Console, *,
                 base_url: str | None = None, registry: str | None = None) -> Iterator[ServedModel]:
    """``model`` answering somewhere for the duration of the block.

    With ``base_url``, ``model`` must be one of the models that server lists. Otherwise ``tracelearn
    serve`` is started on a free port (``TRACELEARN_REGISTRY`` set to ``registry`` when given) and
    stopped on exit; it must serve exactly one model.
    """
    if base_url is not None:
        cards = model_cards(base_url)
        card = next((card for card in cards if card["id"] == model), None)
        if card is None:
            listed = ", ".join(str(card["id"]) for card in cards) or "none"
            raise UnknownModelError(f"{base_url} does not serve {model!r} (it serves: {listed})")
        yield ServedModel(base_url, model, card.get("model_version"))
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = workdir / "server.log"
    env = {**os.environ, REGISTRY_ENV: registry} if registry is not None else dict(os.environ)
    try:
        command = [console_script("tracelearn"), "serve", "--model", model, "--port", str(port)]
        server = start_child(command, name="the model server", log=log, env=env)
    except ChildProcessError as error:
        raise ModelServerError(str(error)) from None
    with server:
        try:
            with console.status(f"loading {model} into tracelearn serve (log: {log}) ..."):
                server.wait_until(lambda: _models_answer(url), timeout_s, "it was ready")
        except ChildProcessError as error:
            raise ModelServerError(str(error)) from None
        cards = model_cards(url)
        if len(cards) != 1:
            raise ModelServerError(f"tracelearn serve at {url} lists {len(cards)} models; expected one")
        served = ServedModel(url, str(cards[0]["id"]), cards[0].get("model_version"))
        console.print(f"serving {model} as {served.name} (version {served.model_version}) at {url}")
        yield served
        # A server that died mid-run fails every later call: the numbers would measure the crash.
        if server.returncode is not None:
            raise ModelServerError(f"the model server exited with code {server.returncode} during the "
                                   f"evaluation: {server.tail()} (log: {log})")

