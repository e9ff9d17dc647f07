#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install mrkd with the given extras.
# Usage: scripts/setup_env.sh EXTRAS   e.g.  scripts/setup_env.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,lite}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # Debian's own Python makes virtual environments only with python3-venv (ensurepip).
  "$python" -c "import ensurepip" 2>/dev/null || scripts/apt_need.sh "creating .venv with $python" python3-venv
  "$python" -m venv .venv
fi
# cpp_ext's C++ part always compiles, PyGObject's C below too, both against Python's headers: a fresh Debian
# has neither compiler, and Debian's own Python keeps its headers in python3-dev.
if ! command -v gcc >/dev/null || ! command -v g++ >/dev/null; then
  scripts/apt_need.sh "compiling cpp_ext" g++
fi
headers="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if [ ! -f "$headers/Python.h" ]; then
  scripts/apt_need.sh "compiling cpp_ext against $headers" python3-dev
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# Build requirements first, so the editable install can compile cpp_ext without build isolation.
.venv/bin/python -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.10" numpy
# PyGObject (gige:// cameras, in the gige and dev extras) has no Linux wheels: it builds against the
# system's GObject introspection and cairo headers, and reads Aravis' typelib at run time. Install them
# with apt where we can (CI runs as root), then build it in an isolated build (meson comes from PyPI).
case ",${extras}," in
  *,dev,*|*,gige,*)
    scripts/apt_need.sh "the gige extra" libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-aravis-0.8
    .venv/bin/python -m pip install --quiet "PyGObject>=3.42,<3.50"
    ;;
esac
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[${extras}]"
