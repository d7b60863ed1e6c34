#!/usr/bin/env bash
# Install Debian's Chromium, the real browser the review page's tests drive through Playwright (Playwright's
# own browser download needs a host clusters and CI machines often cannot reach). Idempotent; needs root or sudo.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "browser install: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo chromium))"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
start=$(date +%s)
log=$(mktemp)
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium; } \
     >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "browser install: apt-get failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
echo "browser install: chromium in $(( $(date +%s) - start )) s"
