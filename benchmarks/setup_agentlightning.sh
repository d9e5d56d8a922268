#!/usr/bin/env bash
# Make benchmarks/.venv-agl: a separate virtual environment with Agent Lightning 0.3.0, the last
# release that carries the span-based v0 design and its TracerTraceToTriplet adapter (the 1.0.x line
# dropped the adapter package for an OpenAI-compatible gateway). 0.3.0 installs on Python >= 3.10;
# we use the pyenv Python 3.11 (or $AGL_PYTHON). Run once, before benchmarks/build_transitions.py;
# the benchmark itself never installs anything.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-agl"
python="${AGL_PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in "$HOME/.pyenv/versions/3.11.7/bin/python" python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
echo "creating $venv with $("$python" --version)"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "agentlightning==0.3.0" pyarrow
"$venv/bin/python" -c "import agentlightning, pyarrow; from agentlightning.adapter import TracerTraceToTriplet; print('agentlightning', agentlightning.__version__ if hasattr(agentlightning, '__version__') else '0.3.0', 'pyarrow', pyarrow.__version__)"
