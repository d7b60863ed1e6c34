#!/usr/bin/env bash
# apt_install LABEL PACKAGE: install one Debian package quietly (its log shown only when apt-get fails), as root
# or through sudo; prints one line with the time it took. Sourced by install-browser.sh and install-postgres.sh.
apt_install() {
  local label=$1 package=$2 sudo="" start log
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  start=$(date +%s)
  log=$(mktemp)
  if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$package"; } \
       >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "$label: apt-get failed (full log: $log)" >&2
    return 1
  fi
  rm -f "$log"
  echo "$label: $package in $(( $(date +%s) - start )) s"
}
