# Source this file to point sbatch, squeue, sinfo, sacct and scontrol at the local test cluster:
#   source slurm/local-cluster/env.sh
# The state folder (config, logs, spool, MariaDB) is $KEELTUNE_SLURM_DIR, /var/tmp/keeltune-slurm by default.
export KEELTUNE_SLURM_DIR="${KEELTUNE_SLURM_DIR:-/var/tmp/keeltune-slurm}"
export SLURM_CONF="$KEELTUNE_SLURM_DIR/etc/slurm.conf"
