#!/usr/bin/env bash
# The demo: serve the embedded model, run the bundled agent under opentelemetry-instrument on its
# tasks, and show what was captured. Arguments go to `tracelearn demo` (for example --quick).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/tracelearn demo "$@"
