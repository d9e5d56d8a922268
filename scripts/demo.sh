#!/usr/bin/env bash
# The demo: the whole learning loop on embedded defaults (serve the policy from the registry, capture the
# bundled agent through the collector sidecar, run the Airflow DAGs: transitions -> train -> evaluate ->
# gate, follow the promotion, re-evaluate). Arguments go to `tracelearn demo` (for example --quick).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
exec .venv/bin/tracelearn demo "$@"
