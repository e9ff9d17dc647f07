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
# PyGObject (gige:// cameras, in the gige and dev extras) has no Linux wheels: it builds against the
# system's GObject introspection and cairo headers, and reads Aravis' typelib at run time. Install them
# with apt where we can (CI runs as root), then build it in an isolated build (meson comes from PyPI).
case ",${extras}," in
  *,dev,*|*,gige,*)
    missing=""
    for package in libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-aravis-0.8; do
      dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
    done
    if [ -n "$missing" ]; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $missing >/dev/null
      else
        echo "The gige extra needs Debian's$missing (apt-get install$missing); run as root or install them." >&2
        exit 1
      fi
    fi
    .venv/bin/python -m pip install --quiet "PyGObject>=3.42,<3.50"
    ;;
esac
.venv/bin/python -m pip install --quiet --no-build-isolation -e ".[${extras}]"
