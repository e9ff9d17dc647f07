#!/usr/bin/env bash
# Set up everything and run the test suite (CPU; GPU/TensorRT tests skip unless both are present).
# With arguments, one pytest run with them (e.g. bash run_tests.sh tests/test_parts.py -x).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh dev
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
fi
# The tests whose native libraries start threads of their own (Aravis/GObject for GigE Vision,
# OpenVINO's plugins, the asyncua/pymodbus servers) run in pytest processes of their own: a library's
# leftover thread then cannot take another part of the suite down with it, and a crash names its group.
isolated=("tests/test_gige.py tests/test_parts.py tests/test_parts_swap.py tests/test_parts_review.py"
          "tests/test_openvino.py tests/test_backends.py" "$(echo tests/test_plc_*.py)")
ignore=()
for group in "${isolated[@]}"; do
  for file in $group; do ignore+=("--ignore=$file"); done
done
status=0
.venv/bin/python -m pytest -q -ra --durations=40 "${ignore[@]}" || status=$?
for group in "${isolated[@]}"; do
  echo "== pytest $group"
  # shellcheck disable=SC2086
  .venv/bin/python -m pytest -q -ra $group || status=$?
done
exit "$status"
