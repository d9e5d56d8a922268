"""The bundled examples are agents as their users would write them: none imports tracelearn (capture
comes from ``opentelemetry-instrument`` or the agent's own OpenTelemetry SDK), so what they show holds
for any agent."""

import ast
import json
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PYTHON_FILES = sorted(EXAMPLES.glob("*/*.py"))
_JS_IMPORT = re.compile(r"""(?:\bfrom\s+|\bimport\s*\(\s*|\brequire\s*\(\s*)['"]([^'"]+)['"]""")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_no_python_example_imports_tracelearn(path: Path) -> None:
    assert not {m for m in imported_modules(path) if m.split(".")[0] == "tracelearn"}


def test_the_python_examples_are_found() -> None:
    names = {str(p.relative_to(EXAMPLES)) for p in PYTHON_FILES}
    assert {"calc/agent.py", "sql/agent.py", "sql/reward.py"} <= names


def test_the_node_example_uses_only_opentelemetry_packages() -> None:
    package = json.loads((EXAMPLES / "node" / "package.json").read_text(encoding="utf-8"))
    dependencies = package["dependencies"]
    assert all(name.startswith("@opentelemetry/") for name in dependencies), dependencies
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", version) for version in dependencies.values()), "exact versions"
    source = (EXAMPLES / "node" / "agent.mjs").read_text(encoding="utf-8")
    imported = set(_JS_IMPORT.findall(source))
    assert imported and {m for m in imported if not m.startswith("node:")} <= set(dependencies), imported
