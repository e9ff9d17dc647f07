#!/usr/bin/env bash
# Set up everything and run the test suite (CPU; GPU/TensorRT tests skip unless both are present).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh dev
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
