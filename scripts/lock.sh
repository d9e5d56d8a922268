#!/usr/bin/env bash
# Refresh requirements.lock, the exact versions scripts/bootstrap.sh installs: resolve the newest versions
# pyproject.toml allows (the dev extra, everything the suite uses) in a fresh environment and pin them.
# Then run scripts/test.sh (the bootstrap reinstalls from the new lock) and commit the lock only if it passes.
# pyproject.toml keeps loose floors for people who install tracelearn into their own environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip --disable-pip-version-check -q install torch==2.13.0 uv
# torch is installed by pip from this machine's CPU wheel (uv would resolve a CUDA build): it stays out of the lock.
"$WORK/venv/bin/uv" pip install -q --python "$WORK/venv/bin/python" -e "$ROOT[dev]"
{
    echo "# The exact versions scripts/bootstrap.sh installs (with pip install torch==2.13.0 first)."
    echo "# Made by scripts/lock.sh from pyproject.toml's dev extra; do not edit by hand."
    "$WORK/venv/bin/uv" pip freeze --python "$WORK/venv/bin/python" --exclude-editable | grep -v -E "^(torch|pip)=="
} > "$ROOT/requirements.lock"
echo "lock: wrote $ROOT/requirements.lock ($(grep -c '==' "$ROOT/requirements.lock") packages)" >&2
