"""The one per-rank entry point: local processes, Slurm jobs and multi-node runs all start this."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from keeltune.training.run_files import CONFIG_FILE
from keeltune.training.stop import StopRequest

STOPPED_EXIT = 3  # stopped by a signal after checkpointing (resumable)


def setup_logging(run_dir: Path, rank: int) -> None:
    """Prefix every line with rank and node; rank 0 talks on the console, every rank writes its own log file."""
    node = (
        os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    )  # Slurm's name for the node, when in a job
    formatter = logging.Formatter(f"%(asctime)s [rank{rank}/{node}] %(levelname)s %(message)s", "%H:%M:%S")
    logger = logging.getLogger("keeltune")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    logger.addHandler(console)
    (run_dir / "logs").mkdir(exist_ok=True)
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)


def set_threads(local_world_size: int) -> None:
    """Share the cores between local ranks on CPU; tell DeepSpeed there is no accelerator to look for."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def ranks_from_slurm() -> None:
    """In a task started by the rendered sbatch script (one task per GPU), torch's variables from Slurm's."""
    if os.environ.get("KEELTUNE_RANKS_FROM_SLURM") != "1" or "SLURM_PROCID" not in os.environ:
        return
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    os.environ.update(
        {
            "RANK": os.environ["SLURM_PROCID"],
            "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": os.environ.get("SLURM_NTASKS", "1"),
            "LOCAL_WORLD_SIZE": per_node,
        }
    )


def train_rank(run_dir: Path, stop: StopRequest | None = None):
    """Join the ranks, build the trainer from the run folder's config, train, and clean up.

    With ``stop``, a signal makes every rank checkpoint at the next step boundary and return early. After a
    time-limit warning (USR2) inside a Slurm job rank 0 requeues the job (at most ``slurm.max_requeues``
    times), which resumes from that checkpoint; after TERM (cancel, or preemption that Slurm requeues itself)
    it does not."""
    from keeltune.config import load_config
    from keeltune.sharding.parallel import ParallelEnv
    from keeltune.training.trainer import Trainer

    config = load_config(run_dir / CONFIG_FILE)
    setup_logging(run_dir, int(os.environ.get("RANK", 0)))
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    parallel = ParallelEnv.from_environment(
        config.training.collective_timeout_s, config.training.preflight_timeout_s
    )
    trainer = None
    try:
        trainer = Trainer(config, parallel)
        summary = trainer.fit(stop)
    finally:
        if trainer is not None:
            trainer.close()
        parallel.close()
    if summary.stopped and parallel.is_main and stop is not None and stop.requeue:
        requeue_slurm_job(config.slurm.max_requeues)
    return summary


def requeue_slurm_job(max_requeues: int) -> bool:
    """Put this Slurm job back in the queue (it resumes from the run's latest checkpoint); False outside Slurm
    or once ``max_requeues`` is spent (Slurm counts restarts in SLURM_RESTART_COUNT)."""
    log = logging.getLogger("keeltune")
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        log.error(
            "not requeued: the job already ran %d time(s) after requeues (slurm.max_requeues=%d); "
            "relaunch the same config to resume from the checkpoint",
            restarts + 1,
            max_requeues,
        )
        return False
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    log.warning("requeued job %s (requeue %d of at most %d)", job, restarts + 1, max_requeues)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keeltune.launcher.entry", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="run folder holding config.yaml")
    args = parser.parse_args(argv)
    from keeltune.config import ConfigError
    from keeltune.data_pipeline.prepare import DataError

    ranks_from_slurm()
    try:
        summary = train_rank(args.run_dir.resolve(), StopRequest().install())
    except (ConfigError, DataError) as err:
        logging.getLogger("keeltune").error("error: %s", err)
        return 2
    return STOPPED_EXIT if summary.stopped else 0


if __name__ == "__main__":
    from keeltune.sharding.parallel import exit_rank

    exit_rank(main())
