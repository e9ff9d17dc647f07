#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install mrkd with the given extras.
# Usage: scripts/setup_env.sh EXTRAS   e.g.  scripts/setup_env.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,lite}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# Build requirements first, so the editable install can compile cpp_ext without build isolation.
.venv/bin/python -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.10" numpy
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[${extras}]"
