"""The process a reward function runs in, so that a call that hangs can be stopped: ``python reward_worker.py SOCKET``.

``tracelearn.pipelines.reward_calls`` starts it by path, not with ``-m``: it imports the standard
library, pyarrow and the user's module only, never tracelearn or polars, so it starts in a fraction of
a second. The rows travel as Arrow, and the Python values the function is called with are built
here, so the build's process does no per-rollout Python work and the two processes work at once.

Protocol over the Unix socket ``SOCKET`` (``multiprocessing.connection`` messages):

1. parent -> worker (pickled) ``{"import_path": [...], "function": "module:function" or "FILE.py:function",
   "file": the resolved FILE or None, "name": "reward", "parameters": [names], "takes_any_keyword": bool}``;
   worker -> parent ``("ready", "")`` or ``("failed", message)`` (the function cannot be found).
   ``import_path`` is the build process's ``sys.path``: the worker is started by file path (so its own
   first entry would be this directory), and a function the build found must be found here alike;
2. parent -> worker (bytes): an Arrow IPC stream of input rows, one call each, in order (columns
   ``rollout_id``, ``task_id``, ``input_messages``, ``output_messages``, ``metadata`` and maybe
   ``spans``, see ``tracelearn.pipelines.rewards``); worker -> parent, per row and in order (pickled):
   ``("ok", {name: value})``, ``("errors", message)`` (the call raised, ``SystemExit`` and
   ``KeyboardInterrupt`` included: user code cannot end the worker that way) or ``("invalid",
   message)`` (the result is not a finite number or a dict of them);
3. the parent closes the socket: the worker exits.

Results are checked here (:func:`named_rewards`), so only plain floats and strings travel back.
:func:`find_function` is the one place a reward function is found, here and in the build's process
(``tracelearn.pipelines.rewards`` checks its signature at config load).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pyarrow as pa

BUILTIN_ARGUMENTS: tuple[str, ...] = ("answer", "messages", "spans", "metadata", "task_id", "rollout_id")
# A reply must stay small: the parent reads replies while its feeder may be blocked sending rows.
MESSAGE_CHARS = 500


def is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def named_rewards(name: str, result: Any) -> dict[str, float]:
    """A call's result as ``{reward name: value}`` (a plain number goes under ``name``); raises
    ``TypeError`` saying what is wrong with it."""
    if isinstance(result, Mapping):
        if not result:
            raise TypeError("returned an empty dict")
        for key, value in result.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"returned a dict with key {key!r}; reward names are non-empty strings")
            if not is_finite_number(value):
                raise TypeError(f"returned {key}={value!r}, not a finite number")
        return {key: float(value) for key, value in result.items()}
    if not is_finite_number(result):
        raise TypeError(f"returned {result!r}, not a finite number or a dict of them")
    return {name: float(result)}


# The arguments of a call ------------------------------------------------------------------------


def _decoded(text: str) -> Any:
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _messages(text: str | None) -> list[dict[str, Any]]:
    if text is None:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _text_content(messages: list[dict[str, Any]]) -> str:
    """The text of the response messages (string content, or the text parts of a parts list)."""
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "".join(texts)


def _as_dict(entries: Any) -> Any:
    """A map stored as a list of ``{key, value}`` entries, as a dict (anything else unchanged)."""
    return {item["key"]: item["value"] for item in entries} if isinstance(entries, list) else entries


def _span_dict(span: dict[str, Any], rollout_id: str) -> dict[str, Any]:
    """A span as the reward function gets it: its maps (attributes, resource attributes, the attributes
    of its events and links) as dicts."""
    plain = {key: _as_dict(value) if key in ("attributes", "resource_attributes") else value
             for key, value in span.items()}
    for nested in ("events", "links"):
        if isinstance(span.get(nested), list):
            plain[nested] = [{**item, "attributes": _as_dict(item.get("attributes"))} for item in span[nested]]
    return {"rollout_id": rollout_id, **plain}


def call_arguments(row: dict[str, Any], parameters: list[str], takes_any_keyword: bool) -> dict[str, Any]:
    """The keyword arguments of one call: builtins by name, other names from the rollout's metadata
    (absent ones were counted as missing input by the parent, or take the parameter's default)."""
    metadata = {item["key"]: _decoded(item["value"]) for item in row.get("metadata") or ()}
    response = _messages(row["output_messages"])
    builtins: dict[str, Callable[[], Any]] = {
        "answer": lambda: _text_content(response),
        "messages": lambda: _messages(row["input_messages"]) + response,
        "spans": lambda: [_span_dict(span, row["rollout_id"]) for span in row.get("spans") or ()],
        "metadata": lambda: metadata,
        "task_id": lambda: row["task_id"],
        "rollout_id": lambda: row["rollout_id"],
    }
    arguments: dict[str, Any] = {}
    for name in parameters:
        if name in builtins:
            arguments[name] = builtins[name]()
        elif name in metadata:
            arguments[name] = metadata[name]
    if takes_any_keyword:
        arguments.update({k: v for k, v in metadata.items() if k not in arguments and k not in builtins})
    return arguments


# Serving the parent -----------------------------------------------------------------------------


def _short(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _load_file(file: str) -> Any:
    """The Python file ``file`` run as a module of its own (registered under a name made from its path,
    so dataclasses and pickling inside it work); raises what loading it raises."""
    digest = hashlib.sha256(file.encode("utf-8")).hexdigest()[:12]
    name = f"_tracelearn_reward_file_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"{file} cannot be loaded as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def find_function(reference: str, file: str | None = None) -> Callable[..., Any]:
    """The function ``reference`` names: ``FILE.py:function`` loaded from ``file`` (the path the parent
    resolved), or ``package.module:function`` imported from the import path.

    Raises ``FileNotFoundError`` (no such file), what importing or running the module raises (its own
    errors included), ``AttributeError`` (no such attribute) or ``TypeError`` (not callable).
    """
    module_name, _, attribute = reference.rpartition(":")
    if file is not None:
        if not Path(file).is_file():
            raise FileNotFoundError(f"no file {file}")
        found: Any = _load_file(file)
    else:
        found = importlib.import_module(module_name)
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise AttributeError(f"{file or module_name} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not callable(found):
        raise TypeError(f"{attribute!r} is a {type(found).__name__}, not a function")
    return found  # type: ignore[no-any-return]


def _call(
    function: Callable[..., Any], path: str, name: str, arguments: Callable[[], dict[str, Any]]
) -> tuple[str, Any]:
    try:
        result = function(**arguments())
    except BaseException as error:  # user code: a SystemExit must not end the worker silently
        return "errors", _short(f"{path} raised {type(error).__name__}: {error}")
    try:
        return "ok", named_rewards(name, result)
    except TypeError as error:
        return "invalid", _short(f"{path} {error}")


def serve(connection: Connection) -> None:
    """Answer the parent until it closes the connection (see the module docstring)."""
    setup = connection.recv()
    sys.path[:] = setup["import_path"]
    path, name = setup["function"], setup["name"]
    try:
        function = find_function(path, setup["file"])
    except BaseException as error:  # reported to the parent, which names the function
        connection.send(("failed", _short(
            f"a fresh Python process cannot load it ({type(error).__name__}: {error}); the function must live "
            "in a file named by its path (FILE.py:function) or in a module on the import path")))
        return
    connection.send(("ready", ""))
    while True:
        try:
            payload = connection.recv_bytes()
        except EOFError:
            return
        for row in pa.ipc.open_stream(payload).read_all().to_pylist():
            arguments = functools.partial(call_arguments, row, setup["parameters"], setup["takes_any_keyword"])
            connection.send(_call(function, path, name, arguments))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the worker stops
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(sys.argv[1])
    connection = Connection(client.detach())
    try:
        serve(connection)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent went away: nothing left to answer
    finally:
        connection.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # a thread the user's module started must not keep the worker alive


if __name__ == "__main__":
    main()
