#!/usr/bin/env bash
# Install the packages of the local test cluster (Slurm 22.05 from Debian 12, munge, slurmdbd, MariaDB).
# Idempotent: does nothing when all of them are installed. Needs root (or sudo) and apt.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "slurm install: already installed (${PACKAGES[*]})"
  exit 0
fi

start=$(date +%s)
echo "slurm install: installing ${missing[*]}"
# The packages' maintainer scripts must not try to start services (there may be no init system): a
# policy-rc.d that forbids it, removed again afterwards unless one was there before.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  own_policy=1
fi
cleanup() { [ "$own_policy" -eq 0 ] || $SUDO rm -f "$policy"; }
trap cleanup EXIT

log=$(mktemp)
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
         -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "slurm install: apt-get failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
echo "slurm install: done in $(( $(date +%s) - start )) s"
