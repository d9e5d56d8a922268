#!/usr/bin/env bash
# The test command: lint (ruff), type-check (mypy), then the test suite (pytest).
# Runs everything, slow end-to-end tests included; `scripts/test.sh --fast` skips tests marked slow.
# Extra arguments go to pytest (for example `scripts/test.sh --fast tests/collector`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
PY=.venv/bin
MARKERS=()
if [[ "${1:-}" == "--fast" ]]; then
    MARKERS=(-m "not slow")
    shift
fi
echo "== ruff" && $PY/ruff check .
echo "== mypy" && MYPYPATH=.typecheck $PY/mypy -m tracelearn $(for d in schemas storage settings processes models instrumentation collector pipelines training serving registry cli; do echo -p tracelearn.$d; done)
echo "== mypy (DAG files)" && MYPYPATH=.typecheck $PY/mypy pipelines/dags/*.py
echo "== pytest" && $PY/python -m pytest "${MARKERS[@]}" "$@"
