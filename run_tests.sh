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
# The benchmarks' smoke test (every benchmark once, 3 minutes) runs with them: beside the main group,
# not in the main group's time.
isolated=("$(echo tests/test_gige*.py) tests/test_parts.py tests/test_parts_swap.py tests/test_parts_review.py"
          "tests/test_openvino.py tests/test_backends.py" "$(echo tests/test_plc_*.py)"
          "tests/test_bench_smoke.py")
ignore=()
for group in "${isolated[@]}"; do
  for file in $group; do ignore+=("--ignore=$file"); done
done
status=0
# The isolated groups run one after another beside the main group, not after it: they spend most of their
# time waiting on their peers (a camera's frames, a PLC client's polls, a broker), so on 2 cores this takes
# the suite from about 30 to under 25 minutes. Their output is kept and shown after the main group's, in
# order. Each simulator has a loopback address of its own and every server a free port, so they never meet.
isolated_log=$(mktemp -t mrkd-isolated-XXXXXX.log)
(
  group_status=0
  # A TERM stops the group's pytest running now, and no later group starts. (Each pytest runs in the background
  # and is waited for: bash runs a trap only once its foreground command has ended.)
  child=""
  trap 'kill -TERM "$child" 2>/dev/null || true; exit 143' TERM
  for group in "${isolated[@]}"; do
    echo "== pytest $group"
    # shellcheck disable=SC2086
    .venv/bin/python -m pytest -q -ra $group &
    child=$!
    wait "$child" || group_status=$?
  done
  exit "$group_status"
) > "$isolated_log" 2>&1 &
isolated_pid=$!
# On an interrupt the groups' pytest stops too (the subshell's TERM trap), and the log goes. No pkill: procps is
# not on a fresh Debian, and killing the subshell's child from here raced with the next group's start.
# (Each command of the trap must succeed: under set -e a failing one, kill finding nothing, is the exit status.)
trap 'kill -TERM "$isolated_pid" 2>/dev/null || true; rm -f "$isolated_log"' EXIT
# The main group's files run in two pytest-xdist processes, each file whole in one of them (its module
# fixtures are built once): one process kept about 0.8 of the 2 cores busy (much of a test is waiting on a
# subprocess, a socket or a file), and serially the group took 27-31 minutes.
.venv/bin/python -m pytest -q -ra --durations=40 -n 2 --dist loadfile "${ignore[@]}" || status=$?
wait "$isolated_pid" || status=$?
cat "$isolated_log"
exit "$status"
