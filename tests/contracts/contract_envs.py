"""The pinned verl and vLLM releases, each in a virtual environment of its own, on CPU: made once, cached.

The contract tests (``test_verl_contract.py``, ``test_vllm_contract.py``) run tracelearn's job files
and launch commands against the real packages, so they need them installed, but not their GPU stack:
verl 0.9.1 imports its trainer config, agent loop, datasets and model merger, and vLLM its ``vllm
serve`` argument parser, without CUDA. Each environment holds the release installed ``--no-deps``
plus the light packages those imports need (``envs/<name>.in``; every transitive package pinned in
``envs/<name>.txt``, torch and its CUDA packages left out) and torch's CPU wheel, ``torch==2.13.0``,
installed first by pip (which takes it from this machine's disk; uv would download a CUDA build).
tracelearn is not installed: the replay loop must run where only verl is.

Made with the framework matrix's machinery (``tests/integration/frameworks/envs.py``: one maker at a
time, uv when present, errors naming the command): an environment lives in
``build/framework-envs/<name>-<pin>/`` (``TRACELEARN_FRAMEWORK_ENVS`` moves the root) and is reused
while its key (spec, lock, torch pin, Python version, this recipe) is unchanged.

    python tests/contracts/contract_envs.py create verl     # make one (or before the tests)
    python tests/contracts/contract_envs.py lock vllm       # re-pin envs/vllm.txt from envs/vllm.in
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration.frameworks import envs

SPECS = Path(__file__).resolve().parent / "envs"
# The releases tested: tracelearn.training.verl_environment.VERL_PIN and tracelearn.serving.vllm_server.VLLM_PIN
# (the tests keep them equal); the first line of each spec pins the same.
PINS = {"verl": "0.9.1", "vllm": "0.33.0"}
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk
# Left out of the lock: torch comes from TORCH, and the CUDA packages a PyPI torch would pull are never wanted.
_NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-[\w-]+|cuda-[\w-]+)==", re.IGNORECASE)
RECIPE_VERSION = "1"
STAMP = ".tracelearn-env"


def _spec(name: str) -> Path:
    if name not in PINS:
        raise envs.EnvSetupError(f"no contract environment {name!r}: known are {', '.join(PINS)}")
    return SPECS / f"{name}.in"


def _lock(name: str) -> Path:
    return SPECS / f"{name}.txt"


def env_path(name: str) -> Path:
    return envs.envs_root() / f"{name}-{PINS[name]}"


def python(name: str) -> Path:
    return env_path(name) / "bin" / "python"


def env_key(name: str) -> str:
    spec, lock_file = _spec(name), _lock(name)
    if not lock_file.is_file():
        raise envs.EnvSetupError(f"{lock_file} is missing: run `python {Path(__file__).name} lock {name}`")
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, envs.python_version(), TORCH, spec.read_text(), lock_file.read_text()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def is_ready(name: str) -> bool:
    stamp = env_path(name) / STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == env_key(name)


def create(name: str) -> Path:
    """The ready environment ``name``, made first if it is missing or stale; returns its python."""
    path = env_path(name)
    with envs._exclusive(envs.envs_root()):
        if is_ready(name):
            return python(name)
        started = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        envs._run([sys.executable, "-m", "venv", str(path)], f"creating the {name} environment")
        envs._run([str(python(name)), "-m", "pip", "install", "--quiet", TORCH], "installing torch's CPU wheel")
        uv = envs.find_uv()
        if uv is not None:
            install = [uv, "pip", "install", "--quiet", "--python", str(python(name))]
        else:
            install = [str(python(name)), "-m", "pip", "install", "--quiet"]
        envs._run([*install, "--no-deps", "-r", str(_lock(name))], f"filling the {name} environment")
        (path / STAMP).write_text(env_key(name) + "\n", encoding="utf-8")
        print(f"contract env {name}: made in {time.monotonic() - started:.1f} s ({path})", file=sys.stderr)
        return python(name)


def lock(name: str) -> Path:
    """Pin ``envs/<name>.in`` into ``envs/<name>.txt`` with uv (torch and CUDA packages left out)."""
    uv = envs.find_uv()
    if uv is None:
        raise envs.EnvSetupError("locking needs uv: `pip install uv`")
    spec = _spec(name).read_text(encoding="utf-8").splitlines()
    # The release's own line is not resolved (that would bring its whole dependency tree): pinned as written.
    release = f"{name}=={PINS[name]}"
    if release not in (line.split("#")[0].strip() for line in spec):
        raise envs.EnvSetupError(f"{_spec(name)} must pin {release}, the release the contract tests check")
    with tempfile.TemporaryDirectory() as scratch:
        sources = Path(scratch) / "requirements.in"
        unresolved = [line for line in spec if not line.startswith(f"{name}==")]
        sources.write_text("\n".join(unresolved) + "\n", encoding="utf-8")
        output = envs._run(
            [uv, "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python-version",
             envs.python_version(), str(sources)],
            f"locking {name}",
        )
    pins = [release] + [line for line in output.splitlines() if line.strip() and not _NOT_LOCKED.match(line)]
    header = (
        f"# Made by `python tests/contracts/contract_envs.py lock {name}` from {name}.in; do not edit.\n"
        f"# Installed --no-deps after {TORCH} (torch, triton and CUDA packages are left out).\n"
    )
    _lock(name).write_text(header + "\n".join(pins) + "\n", encoding="utf-8")
    return _lock(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["create", "lock", "list"])
    parser.add_argument("names", nargs="*", help="environments (default: all)")
    args = parser.parse_args(argv)
    try:
        for name in args.names or list(PINS):
            if args.command == "create":
                print(create(name))
            elif args.command == "lock":
                print(lock(name))
            else:
                print(f"{name}\t{'ready' if is_ready(name) else 'missing'}\t{python(name)}")
    except envs.EnvSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
