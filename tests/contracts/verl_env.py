"""The pinned verl release in a virtual environment of its own, on CPU: made once, cached, reused.

The contract tests (``test_verl_contract.py``) run tracelearn's verl job files against verl's own
code, so they need verl installed, but not its GPU stack: verl 0.9.1 imports its trainer config,
agent loop, datasets and model merger without vLLM, flash-attn or CUDA. The environment holds
``verl==0.9.1`` installed ``--no-deps`` plus the light packages those imports need (``envs/verl.in``,
every transitive package pinned in ``envs/verl.txt``, torch and its CUDA packages left out) and
torch's CPU wheel, ``torch==2.13.0``, installed first by pip (which takes it from this machine's
disk; uv would download a CUDA build). tracelearn is not installed: the replay loop must run where
only verl is.

Made with the framework matrix's machinery (``tests/integration/frameworks/envs.py``: one maker at a
time, uv when present, errors naming the command): it lives in ``build/framework-envs/verl-<pin>/``
(``TRACELEARN_FRAMEWORK_ENVS`` moves the root) and is reused while its key (spec, lock, torch pin,
Python version, this recipe) is unchanged.

    python tests/contracts/verl_env.py create     # make it (bootstrap, or before the tests)
    python tests/contracts/verl_env.py lock       # re-pin envs/verl.txt from envs/verl.in
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
SPEC, LOCK = SPECS / "verl.in", SPECS / "verl.txt"
VERL_PIN = "0.9.1"  # tracelearn.training.verl_environment.VERL_PIN (a test keeps the two equal)
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk
# Left out of the lock: torch comes from TORCH, and the CUDA packages a PyPI torch would pull are never wanted.
_NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-[\w-]+|cuda-[\w-]+)==", re.IGNORECASE)
RECIPE_VERSION = "1"
STAMP = ".tracelearn-env"


def env_path() -> Path:
    return envs.envs_root() / f"verl-{VERL_PIN}"


def python() -> Path:
    return env_path() / "bin" / "python"


def env_key() -> str:
    if not LOCK.is_file():
        raise envs.EnvSetupError(f"{LOCK} is missing: run `python {Path(__file__).name} lock`")
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, envs.python_version(), TORCH, SPEC.read_text(), LOCK.read_text()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def is_ready() -> bool:
    stamp = env_path() / STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == env_key()


def create() -> Path:
    """The ready environment, made first if it is missing or stale; returns its python."""
    path = env_path()
    with envs._exclusive(envs.envs_root()):
        if is_ready():
            return python()
        started = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        envs._run([sys.executable, "-m", "venv", str(path)], "creating the verl environment")
        envs._run([str(python()), "-m", "pip", "install", "--quiet", TORCH], "installing torch's CPU wheel")
        uv = envs.find_uv()
        if uv is not None:
            install = [uv, "pip", "install", "--quiet", "--python", str(python())]
        else:
            install = [str(python()), "-m", "pip", "install", "--quiet"]
        envs._run([*install, "--no-deps", "-r", str(LOCK)], "filling the verl environment")
        (path / STAMP).write_text(env_key() + "\n", encoding="utf-8")
        print(f"verl env: made in {time.monotonic() - started:.1f} s ({path})", file=sys.stderr)
        return python()


def lock() -> Path:
    """Pin ``envs/verl.in`` into ``envs/verl.txt`` with uv (torch and CUDA packages left out)."""
    uv = envs.find_uv()
    if uv is None:
        raise envs.EnvSetupError("locking needs uv: `pip install uv`")
    spec = SPEC.read_text(encoding="utf-8").splitlines()
    # verl's own line is not resolved (that would bring its whole dependency tree): it is pinned as written.
    verl = [line.split("#")[0].strip() for line in spec if line.startswith("verl==")]
    with tempfile.TemporaryDirectory() as scratch:
        sources = Path(scratch) / "requirements.in"
        sources.write_text("\n".join(line for line in spec if not line.startswith("verl==")) + "\n", encoding="utf-8")
        output = envs._run(
            [uv, "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python-version",
             envs.python_version(), str(sources)],
            "locking verl",
        )
    pins = verl + [line for line in output.splitlines() if line.strip() and not _NOT_LOCKED.match(line)]
    header = (
        "# Made by `python tests/contracts/verl_env.py lock` from verl.in; do not edit.\n"
        f"# Installed --no-deps after {TORCH} (torch, triton and CUDA packages are left out).\n"
    )
    LOCK.write_text(header + "\n".join(pins) + "\n", encoding="utf-8")
    return LOCK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["create", "lock", "path"])
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            print(create())
        elif args.command == "lock":
            print(lock())
        else:
            print(f"{python()}\t{'ready' if is_ready() else 'missing'}")
    except envs.EnvSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
