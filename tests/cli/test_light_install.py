"""A light install runs the commands it has: only the invoked subcommand's imports are loaded."""

import subprocess
import sys
import textwrap

BLOCKED = ("polars", "yaml", "torch", "airflow", "transformers", "duckdb", "matplotlib")

# Runs the CLI in a fresh interpreter where importing any of BLOCKED fails as if it were not installed.
_PROGRAM = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    from tracelearn.cli import main
    main({argv!r}, prog_name="tracelearn")
    """
)


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    program = _PROGRAM.format(blocked=set(BLOCKED), argv=list(argv))
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False)


def test_collector_serve_help_needs_none_of_the_heavy_packages() -> None:
    result = run_cli("collector", "serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "--data" in result.stdout


def test_top_level_help_lists_every_command_without_the_heavy_packages() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("collector", "spans", "transitions", "train", "serve"):
        assert command in result.stdout


def test_a_command_whose_package_is_missing_says_what_to_install() -> None:
    result = run_cli("train", "--help")
    assert result.returncode == 1
    assert "not installed" in result.stderr and "pip install" in result.stderr
    assert "Traceback" not in result.stderr
