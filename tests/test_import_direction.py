"""Data flows one way: every import of a library module runs along the flow, never against it.

The table below is the dependency rule (each folder's ``__init__`` docstring says the same in words
under "May import", and a test here keeps the two equal). The test reads every library module's imports with
``ast`` (module level, inside functions and under ``TYPE_CHECKING`` alike) and fails on an import of
another part that its row does not allow, naming the file, the line and the module imported.

    schemas, storage, settings, processes      the ground: import no other part
    instrumentation, collector                 capture, above schemas
    registry                                   used by models, training and serving
    models                                     finding and loading models: used by training and serving
    pipelines                                  above the collector
    training                                   above pipelines; never serving
    serving                                    never training or pipelines
    cli, pipelines/dags                        the outermost layer: nothing imports them
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUND = frozenset({"schemas", "storage", "settings"})
EVERY_PART = frozenset(
    {"schemas", "storage", "settings", "processes", "instrumentation", "collector", "registry", "models", "pipelines",
     "training", "serving"}
)

# part -> the other parts it may import.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "storage": frozenset(),
    "settings": frozenset(),
    "processes": frozenset(),
    "instrumentation": frozenset({"schemas", "settings"}),
    "collector": GROUND,
    "registry": frozenset({"storage", "settings"}),
    "models": frozenset({"registry", "settings"}),
    "pipelines": GROUND | {"processes", "collector"},
    "training": GROUND | {"processes", "instrumentation", "collector", "pipelines", "registry", "models"},
    "serving": GROUND | {"processes", "instrumentation", "registry", "models"},
    "cli": EVERY_PART,
    "pipelines/dags": EVERY_PART,
    # The package itself: the agent-side API (``tracelearn.rollout``, ``emit_reward``, ``prompt``).
    "tracelearn": frozenset({"instrumentation", "registry"}),
}

# Imports against the rule in files other helpers are changing now; each names what resolves it.
# An entry that no longer occurs fails the test, so this list only shrinks.
PENDING: dict[tuple[str, str], str] = {}


def part_of_file(path: Path) -> str:
    relative = path.relative_to(ROOT).parts
    if relative[0] == "pipelines" and len(relative) > 2 and relative[1] == "dags":
        return "pipelines/dags"
    return "tracelearn" if len(relative) == 1 else relative[0]


def part_of_module(module: str) -> str | None:
    """The part a ``tracelearn...`` module belongs to (``None``: not ours)."""
    names = module.split(".")
    if names[0] != "tracelearn":
        return None
    if len(names) == 1:
        return "tracelearn"
    if names[1] == "pipelines" and len(names) > 2 and names[2] == "dags":
        return "pipelines/dags"
    return names[1]


def library_files() -> list[Path]:
    folders = [ROOT / name for name in MAY_IMPORT if name not in ("tracelearn", "pipelines/dags")]
    files = [ROOT / "__init__.py", *(path for folder in folders for path in folder.rglob("*.py"))]
    return sorted(path for path in files if "__pycache__" not in path.parts)


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import; ``from tracelearn import x`` counts as ``tracelearn.x``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if node.module == "tracelearn":
                found += [(node.lineno, f"tracelearn.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def imports_against_the_flow() -> tuple[list[str], set[tuple[str, str]]]:
    """Violations (``file:line: part -> module``) and the (file, part) pairs of those that are pending."""
    violations: list[str] = []
    pending_seen: set[tuple[str, str]] = set()
    for path in library_files():
        source = part_of_file(path)
        assert source in MAY_IMPORT, f"{path.relative_to(ROOT)}: a new part; give it a row in MAY_IMPORT"
        for line, module in imported_modules(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            target = part_of_module(module)
            if target is None or target == source:
                continue
            if target == "tracelearn" and module != "tracelearn":
                target = module.split(".")[1]  # ``from tracelearn import x`` where x is an attribute
            if target in MAY_IMPORT[source]:
                continue
            relative = str(path.relative_to(ROOT))
            if (relative, target) in PENDING:
                pending_seen.add((relative, target))
                continue
            violations.append(f"{relative}:{line}: {source} -> {module}")
    return violations, pending_seen


def test_no_library_module_imports_against_the_flow() -> None:
    violations, pending_seen = imports_against_the_flow()
    assert not violations, "imports against the dependency rule (see MAY_IMPORT):\n" + "\n".join(violations)
    assert pending_seen == set(PENDING), f"resolved: remove from PENDING: {sorted(set(PENDING) - pending_seen)}"


def test_nothing_imports_the_outermost_layer() -> None:
    for part, allowed in MAY_IMPORT.items():
        if part not in ("cli", "pipelines/dags"):
            assert not allowed & {"cli", "pipelines/dags"}, part
    assert all("cli" not in allowed and "pipelines/dags" not in allowed for allowed in MAY_IMPORT.values())


MAY_IMPORT_SENTENCE = re.compile(r"May import:(.*?)(?:Must never|\n\n|$)", re.DOTALL)


@pytest.mark.parametrize("part", sorted(EVERY_PART))
def test_each_folder_says_what_it_may_import(part: str) -> None:
    """The ``__init__`` docstring's "May import" names exactly the parts of this table."""
    docstring = ast.get_docstring(ast.parse((ROOT / part / "__init__.py").read_text(encoding="utf-8"))) or ""
    sentence = MAY_IMPORT_SENTENCE.search(docstring)
    assert sentence is not None, f"{part}/__init__.py: its docstring has no 'May import:'"
    named = set(re.findall(r"tracelearn\.(\w+)", sentence.group(1)))
    assert named == set(MAY_IMPORT[part]), f"{part}/__init__.py says it may import {sorted(named)}"
