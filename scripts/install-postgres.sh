#!/usr/bin/env bash
# Install Debian's PostgreSQL server, the real database the sweep's Optuna RDB storage test runs against
# (tests/postgres.py starts a throwaway cluster of its own on 127.0.0.1; no system cluster is used). Idempotent;
# needs root or sudo.
set -euo pipefail
shopt -s nullglob
servers=(/usr/lib/postgresql/*/bin/postgres)
shopt -u nullglob
if [ "${#servers[@]}" -gt 0 ]; then
  newest=$(printf '%s\n' "${servers[@]}" | sort -V | tail -n 1)
  echo "postgres install: already installed ($("$newest" --version 2>/dev/null || echo "$newest"))"
  exit 0
fi
source "$(dirname "$0")/apt-install.sh"
apt_install "postgres install" postgresql
