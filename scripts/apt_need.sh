#!/usr/bin/env bash
# Install those of the Debian packages named that are not installed (apt-get, as root); elsewhere exit 1 with
# one line naming them. Usage: scripts/apt_need.sh "WHAT NEEDS THEM" PACKAGE...
# Installed means dpkg's "install ok installed": a removed package whose configuration files remain (dpkg -s
# still answers 0 for it) is missing.
set -euo pipefail
what="$1"
shift
missing=""
for package in "$@"; do
  status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
  [ "$status" = "install ok installed" ] || missing="$missing $package"
done
[ -n "$missing" ] || exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  # the package lists once per boot (/tmp), shared with the tests' installs (tests/peers.py): a fresh
  # `setup_env.sh dev` called this up to four times, each updating again
  updated="${MRKD_APT_UPDATED:-/tmp/mrkd-tests-apt.updated}"
  if [ ! -e "$updated" ]; then
    apt-get update -qq >/dev/null
    touch "$updated"
  fi
  # lists from earlier this boot may be stale by now (a package moved on): update and try once more
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $missing >/dev/null; }
else
  echo "Error: $what needs Debian's$missing (apt-get install$missing); run this as root or install them." >&2
  exit 1
fi
