"""verl's own Python environment: the pinned release, how to make the environment, and finding it.

verl pins its own torch, transformers and vLLM (verl 0.9.1's ``[vllm]`` extra: torch 2.11, vLLM 0.24,
transformers 5.9), none of which tracelearn's environment can share, so the verl job always runs in a
virtual environment of its own. ``VERL_PIN`` is the release the job is written for and tested
against (``tests/contracts/`` installs it); ``VERL_VERSIONS`` is the range a job accepts at launch:
the 0.9 line, whose trainer (V1, TransferQueue), config keys and checkpoint layout the overrides
and the replay loop are written for. Outside it, the launch stops before anything runs, naming the
range and the command that makes a matching environment.

May import: the standard library and ``tracelearn.settings`` (the CLI and the DAG use it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tracelearn.settings.variables import VERL_PYTHON

__all__ = [
    "INSTALL_COMMAND",
    "VERL_PIN",
    "VERL_PYTHON_ENV",
    "VERL_VERSIONS",
    "VerlNotAvailableError",
    "find_verl_python",
    "verl_version_check",
    "version_in_range",
]

VERL_PIN = "0.9.1"
# Lowest accepted release (inclusive) and first refused one: the 0.9 line.
VERL_VERSIONS = ("0.9.0", "0.10")
VERL_PYTHON_ENV = VERL_PYTHON.name
INSTALL_COMMAND = f"python3.12 -m venv ~/verl-env && ~/verl-env/bin/pip install 'verl[vllm]=={VERL_PIN}'"
# Importing verl pulls in torch; on a cold file cache that takes a while.
CHECK_TIMEOUT_S = 300.0
HOW_TO_INSTALL = (
    "verl pins its own torch and vLLM, so it lives in an environment of its own: on a CUDA machine run "
    f"`{INSTALL_COMMAND}`, then pass --verl-python ~/verl-env/bin/python or set {VERL_PYTHON_ENV}. "
    "Everything else in tracelearn (capture, pipelines, export, the torch GRPO/SFT trainers) runs without it."
)


class VerlNotAvailableError(RuntimeError):
    """No usable verl environment: says which Python was tried, what it has, and how to create one."""


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string (``0.9.1.dev3+g12`` -> ``(0, 9, 1)``)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"{version!r} is not a version number")
    return tuple(int(part) for part in match.group().split("."))


def version_in_range(version: str, versions: tuple[str, str] = VERL_VERSIONS) -> bool:
    """Whether ``version`` lies in ``[versions[0], versions[1])`` (release numbers only)."""
    low, high = (_release(bound) for bound in versions)
    return low <= _release(version) < high


def verl_version_check(versions: tuple[str, str] = VERL_VERSIONS) -> str:
    """Python source, run by verl's Python, that exits non-zero (saying why) unless its verl fits ``versions``.

    Standard library and ``verl`` only, so the launch script runs it as ``python -c`` before the job.
    """
    low, high = versions
    needs = f" is installed; this job needs verl >={low},<{high} (tested with {VERL_PIN}): {INSTALL_COMMAND}"
    return (
        "import importlib.util, re, sys\n"
        "import verl\n"
        "def release(v):\n"
        "    return tuple(int(p) for p in re.match(r'\\d+(?:\\.\\d+)*', v).group().split('.'))\n"
        f"if not release({low!r}) <= release(verl.__version__) < release({high!r}):\n"
        f"    sys.exit('verl ' + verl.__version__ + {needs!r})\n"
        "if importlib.util.find_spec('verl.experimental.agent_loop') is None:\n"
        "    sys.exit('verl ' + verl.__version__ + ' has no verl.experimental.agent_loop (the replay loop needs it)')\n"
        "print(verl.__version__)\n"
    )


def find_verl_python(explicit: str | None) -> str:
    """The Python of verl's environment: ``explicit`` (``--verl-python``), else ``$TRACELEARN_VERL_PYTHON``.

    Checked by running it: verl must import, be a release in ``VERL_VERSIONS`` and have
    ``verl.experimental.agent_loop``. Raises :class:`VerlNotAvailableError` saying what was tried and
    how to create the environment.
    """
    source = "--verl-python" if explicit else f"${VERL_PYTHON_ENV}"
    configured = VERL_PYTHON.optional()
    candidate = explicit or (str(configured) if configured is not None else None)
    if not candidate:
        raise VerlNotAvailableError(
            f"no Python for verl: pass --verl-python or set {VERL_PYTHON_ENV}. {HOW_TO_INSTALL}"
        )
    found = shutil.which(candidate)
    if found is None:
        raise VerlNotAvailableError(f"{candidate} (from {source}) is not an executable Python. {HOW_TO_INSTALL}")
    # Absolute but not resolved: a venv's python is a symlink, and resolving it would leave the venv.
    python = str(Path(found).absolute())
    try:
        check = subprocess.run(
            [python, "-c", verl_version_check()], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise VerlNotAvailableError(
            f"{python} (from {source}) did not import verl within {CHECK_TIMEOUT_S:.0f} s. {HOW_TO_INSTALL}"
        ) from error
    except OSError as error:
        raise VerlNotAvailableError(f"{python} (from {source}) cannot be run: {error}. {HOW_TO_INSTALL}") from error
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or [f"exit status {check.returncode}"])[-1]
        raise VerlNotAvailableError(f"{python} (from {source}) has no usable verl: {reason}. {HOW_TO_INSTALL}")
    return python
