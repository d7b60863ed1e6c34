#!/usr/bin/env bash
# Stop the local test cluster: the four slurmd, slurmctld, slurmdbd, its MariaDB, and munged when start.sh
# started it. The state folder stays, so the next start.sh keeps the job history. Idempotent.
set -euo pipefail
source "$(dirname "$0")/common.sh"

lock_state
stop_slurm_daemons
stop_daemon "$DB_PID" mariadbd
if [ -e "$MUNGE_OURS" ]; then
  stop_daemon "$MUNGE_PID" munged
  rm -f "$MUNGE_OURS"
fi
echo "slurm cluster: stopped (state kept in $STATE)"
