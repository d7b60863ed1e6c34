# Shared by start.sh and stop.sh: where each part of the local cluster lives, and daemon liveness checks.
# shellcheck shell=bash
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

STATE=$KEELTUNE_SLURM_DIR
ETC_DIR=$STATE/etc
RUN_DIR=$STATE/run
LOG_DIR=$STATE/log
SPOOL_DIR=$STATE/spool
DB_DIR=$STATE/mariadb
DB_SOCKET=$RUN_DIR/mariadb.sock
DB_PID=$RUN_DIR/mariadb.pid
DB_PORT=13306
CTLD_PORT=16817
DBD_PORT=16819
NODES=(n1 n2 n3 n4 nodns1 nodns2)  # slurmd ports 17001..17006 (slurm.conf); nodns* are in no /etc/hosts or DNS
CLUSTER_NAME=keeltune
MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_PID=/run/munge/munged.pid
MUNGE_OURS=$RUN_DIR/munged.started   # present when start.sh started munged (stop.sh stops only that one)

# The pid in PIDFILE when that process runs and is called NAME. Zombies count as dead: PID 1 on these
# machines does not reap, so `kill -0` would see a dead daemon as alive.
live_pid() {
  local pidfile=$1 name=$2 pid stat
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  stat=${stat##*) }
  case ${stat:0:1} in Z | X | x) return 1 ;; esac
  echo "$pid"
}

# Send SIGTERM to the daemon of PIDFILE, wait up to 30 s for it to end, then SIGKILL.
stop_daemon() {
  local pidfile=$1 name=$2 pid i
  pid=$(live_pid "$pidfile" "$name") || { rm -f "$pidfile"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    live_pid "$pidfile" "$name" >/dev/null || break
    sleep 0.1
  done
  if live_pid "$pidfile" "$name" >/dev/null; then
    echo "slurm cluster: $name ($pid) ignored SIGTERM for 30 s, killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# The Slurm daemons, last started first stopped.
stop_slurm_daemons() {
  local node
  for node in "${NODES[@]}"; do stop_daemon "$RUN_DIR/slurmd-$node.pid" slurmd; done
  stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld
  stop_daemon "$RUN_DIR/slurmdbd.pid" slurmdbd
}

# Hold the state folder's lock (fd 9) until the calling script ends, so that two start.sh (say two test runs),
# or a start.sh and a stop.sh, never start a daemon twice or stop one half-way. (start.sh's launch keeps it
# from the daemons.)
lock_state() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock 9
}
