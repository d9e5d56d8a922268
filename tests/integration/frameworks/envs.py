"""The framework matrix's virtual environments: made once from pinned requirements, cached, reused.

Frameworks and instrumentations that cannot share one environment (CrewAI pins ``openai<3``, the
Agents SDK needs ``openai>=3``; Traceloop, OpenInference and the official GenAI instrumentation all
register the instrumentor names ``openai``, ``langchain``, ...) each get their own environment,
described by ``envs/<name>.in`` (the packages a user would add to ``pip install tracelearn``) and
locked, every transitive package pinned, in ``envs/<name>.txt``. tracelearn itself is installed from
this repository (editable) with its base dependencies only, so every run also proves that the light
install captures. A ``# without: DIST`` line in a spec uninstalls DIST afterwards (to capture with one
convention alone, without the Traceloop OpenAI instrumentation that tracelearn depends on).

An environment lives in ``build/framework-envs/<name>/`` (``TRACELEARN_FRAMEWORK_ENVS`` moves the
root) and is reused while its key (a hash of the spec, its lock, tracelearn's dependencies and
entry points in ``pyproject.toml`` and the Python version) is unchanged; otherwise it is made again.
Everything from PyPI is fetched here, never while the matrix runs. ``uv`` is used when it is next to
this Python or on PATH (much faster: it links packages from its cache), else ``venv`` + ``pip``.

    python tests/integration/frameworks/envs.py create          # every environment (bootstrap)
    python tests/integration/frameworks/envs.py create genai    # one
    python tests/integration/frameworks/envs.py lock            # re-pin envs/*.txt from envs/*.in
    python tests/integration/frameworks/envs.py list            # names, paths, whether ready
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SPECS = Path(__file__).resolve().parent / "envs"
ROOT_VARIABLE = "TRACELEARN_FRAMEWORK_ENVS"
STAMP = ".tracelearn-env"
WITHOUT = "# without:"
# Bump when the way an environment is made changes, so every cached one is made again.
RECIPE_VERSION = "1"
INSTALL_TIMEOUT_S = 1800


class EnvSetupError(RuntimeError):
    """An environment could not be made; the message names it, the command and what to do."""


def envs_root() -> Path:
    return Path(os.environ.get(ROOT_VARIABLE) or REPO / "build" / "framework-envs")


def names() -> list[str]:
    """Every environment with a spec (``envs/<name>.in``), sorted."""
    return sorted(path.stem for path in SPECS.glob("*.in"))


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def env_path(name: str) -> Path:
    return envs_root() / name


def env_bin(name: str) -> Path:
    return env_path(name) / "bin"


def env_key(name: str) -> str:
    """What the environment is made from: its spec and lock, tracelearn's project table, Python, this recipe."""
    lock = SPECS / f"{name}.txt"
    if not lock.is_file():
        raise EnvSetupError(f"{lock} is missing: run `python {Path(__file__).name} lock {name}` to pin {name}.in")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # What an install of tracelearn into the environment depends on (extras do not matter: none is installed).
    installed = {key: project.get(key) for key in ("dependencies", "entry-points", "scripts", "requires-python")}
    digest = hashlib.sha256()
    spec, pins = (SPECS / f"{name}.in").read_text(encoding="utf-8"), lock.read_text(encoding="utf-8")
    for part in (RECIPE_VERSION, python_version(), repr(sorted(installed.items())), spec, pins):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def removed_after_install(name: str) -> list[str]:
    """The distributions the spec's ``# without:`` lines remove once the environment is filled."""
    lines = (SPECS / f"{name}.in").read_text(encoding="utf-8").splitlines()
    return [line.removeprefix(WITHOUT).strip() for line in lines if line.startswith(WITHOUT)]


def is_ready(name: str) -> bool:
    stamp = env_path(name) / STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == env_key(name)


def find_uv() -> str | None:
    beside_python = Path(sys.executable).parent / "uv"
    return str(beside_python) if beside_python.is_file() else shutil.which("uv")


def _run(command: Sequence[str], what: str) -> str:
    environment = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=environment, check=False
        )
    except subprocess.TimeoutExpired as timeout:
        raise EnvSetupError(f"{what}: `{' '.join(command)}` ran past {INSTALL_TIMEOUT_S} s") from timeout
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-25:])
        raise EnvSetupError(
            f"{what}: `{' '.join(command)}` exited {done.returncode}:\n{tail}\n"
            "The framework matrix installs its packages from PyPI when its environments are made (never while "
            f"it runs): run `python {Path(__file__).relative_to(REPO)} create` where PyPI is reachable."
        )
    return done.stdout


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One maker at a time (bootstrap and a test run may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create(name: str) -> Path:
    """The ready environment ``name``, made first if it is missing or stale; returns its path."""
    if name not in names():
        raise EnvSetupError(f"no environment {name!r}: known are {', '.join(names())}")
    path = env_path(name)
    with _exclusive(envs_root()):
        if is_ready(name):
            return path
        started = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        lock = str(SPECS / f"{name}.txt")
        uv = find_uv()
        if uv is not None:
            _run([uv, "venv", "--quiet", "--python", sys.executable, str(path)], f"creating {name}")
            python = str(path / "bin" / "python")
            _run([uv, "pip", "install", "--quiet", "--python", python, "-r", lock, "-e", str(REPO)], f"filling {name}")
            if removed := removed_after_install(name):
                _run([uv, "pip", "uninstall", "--quiet", "--python", python, *removed], f"thinning {name}")
        else:
            _run([sys.executable, "-m", "venv", str(path)], f"creating {name}")
            pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"]
            _run([*pip, "-r", lock, "-e", str(REPO)], f"filling {name}")
            if removed := removed_after_install(name):
                _run([str(path / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "--yes", *removed],
                     f"thinning {name}")
        (path / STAMP).write_text(env_key(name) + "\n", encoding="utf-8")
        print(f"framework env {name}: made in {time.monotonic() - started:.1f} s ({path})", file=sys.stderr)
        return path


def lock(name: str) -> Path:
    """Pin ``envs/<name>.in`` (and tracelearn's base dependencies) into ``envs/<name>.txt`` with uv."""
    uv = find_uv()
    if uv is None:
        raise EnvSetupError("locking needs uv: `pip install uv`")
    target = SPECS / f"{name}.txt"
    with tempfile.TemporaryDirectory() as scratch:
        sources = Path(scratch) / "requirements.in"
        sources.write_text(f"-r {SPECS / f'{name}.in'}\n-e {REPO}\n", encoding="utf-8")
        output = _run(
            [uv, "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python-version", python_version(),
             str(sources)],
            f"locking {name}",
        )
    pins = [line for line in output.splitlines() if line.strip() and not line.startswith("-e ")]
    header = f"# Made by `python tests/integration/frameworks/envs.py lock {name}` from {name}.in; do not edit.\n"
    target.write_text(header + "\n".join(pins) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("create", "lock", "list"):
        sub = commands.add_parser(command)
        sub.add_argument("names", nargs="*", help="environments (default: all)")
    args = parser.parse_args(argv)
    chosen = args.names or names()
    try:
        for name in chosen:
            if args.command == "create":
                create(name)
            elif args.command == "lock":
                print(lock(name))
            else:
                print(f"{name}\t{'ready' if is_ready(name) else 'missing'}\t{env_path(name)}")
    except EnvSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
