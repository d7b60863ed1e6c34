#!/usr/bin/env bash
# Install Debian's Chromium, the real browser the review page's tests drive through Playwright (Playwright's
# own browser download needs a host clusters and CI machines often cannot reach). Idempotent; needs root or sudo.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "browser install: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo chromium))"
  exit 0
fi
source "$(dirname "$0")/apt-install.sh"
apt_install "browser install" chromium
