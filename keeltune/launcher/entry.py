"""The one per-rank entry point: local processes, Slurm jobs and multi-node runs all start this."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from keeltune.config import Config, ConfigError
from keeltune.data_pipeline.sources import DataError
from keeltune.launcher.rank_records import Heartbeat, heartbeat_interval, silence_note
from keeltune.run_folder import CONFIG_FILE, RANK_LOG, logs_dir
from keeltune.training.manifest import CheckpointError
from keeltune.training.stop import StopRequest

STOPPED_EXIT = 3  # every rank stopped cleanly by a signal, after checkpointing (resumable)
log = logging.getLogger("keeltune")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Prefix every line with rank and node; rank 0 talks on the console, every rank writes its own log file."""
    node = node_name()
    formatter = logging.Formatter(f"%(asctime)s [rank{rank}/{node}] %(levelname)s %(message)s", "%H:%M:%S")
    logger = logging.getLogger("keeltune")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    logger.addHandler(console)
    logs_dir(run_dir).mkdir(exist_ok=True)
    file_handler = logging.FileHandler(logs_dir(run_dir) / RANK_LOG.format(rank=rank))
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


def train_rank(run_dir: Path, stop: StopRequest | None = None):
    """Join the ranks, build the trainer from the run folder's config, train, and clean up.

    With ``stop``, a signal makes every rank checkpoint at the next step boundary and return early. After a
    time-limit warning (USR2) inside a Slurm job rank 0 requeues the job (at most ``slurm.max_requeues``
    times), which resumes from that checkpoint; after TERM (cancel, or preemption that Slurm requeues itself)
    it does not. The checkpoint comes first, W&B is closed after it (its failures are logged, never raised),
    and no rank leaves before every rank has closed. The rank's record (``logs/rank<R>.json``) keeps a
    heartbeat and then says how it ended; a failure goes into the rank's own log with its traceback, naming any
    rank that fell silent."""
    from keeltune.config import load_config
    from keeltune.distributed import ParallelEnv
    from keeltune.training.trainer import Trainer

    config = load_config(run_dir / CONFIG_FILE)
    if "wandb" not in sys.modules:  # a W&B service of whoever started this process is not this run's
        os.environ.pop("WANDB_SERVICE", None)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    setup_logging(run_dir, rank)
    register_slurm_job(run_dir, config, rank)
    heartbeat = Heartbeat(
        run_dir, rank=rank, world_size=world_size, node=node_name(),
        interval=heartbeat_interval(config.training.collective_timeout_s),
    ).start()  # fmt: skip
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    parallel = trainer = None
    not_requeued = ""
    try:
        parallel = ParallelEnv.from_environment(
            config.training.collective_timeout_s, config.training.preflight_timeout_s
        )
        trainer = Trainer(config, parallel)
        heartbeat.watch(lambda built=trainer: built.step)
        summary = trainer.fit(stop)
        trainer.close()  # W&B after the checkpoint; its failures are logged, never raised
        trainer = None
        parallel.barrier()  # everyone has closed: a rank that leaves first cannot cut another short
        if summary.stopped and parallel.is_main and stop is not None and stop.requeue:
            not_requeued = requeue_slurm_job(config.slurm.max_requeues)
    except BaseException as err:
        detail = f"{type(err).__name__}: {err}"
        silent = silence_note(heartbeat.silent_ranks())
        if silent:
            detail += f" [{silent}]"
        expected = isinstance(err, (ConfigError, DataError, CheckpointError))
        log.error("rank %d failed: %s", rank, detail, exc_info=not expected)
        heartbeat.end("failed", detail)
        if trainer is not None:
            with contextlib.suppress(Exception):  # the failure above is the one to report
                trainer.close()
        raise
    finally:
        if parallel is not None:
            parallel.close()
    detail = "; ".join(text for text in (summary.stopped or summary.ended_early, not_requeued) if text)
    heartbeat.end("stopped" if summary.stopped else "finished", detail)
    return summary


def node_name() -> str:
    """Slurm's name for this node inside a job, the host name elsewhere."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def register_slurm_job(run_dir: Path, config: Config, rank: int) -> None:
    """A job submitted by hand (the rendered sbatch script) records itself in the run folder, like ``keeltune
    launch`` does, so that ``status``, ``logs`` and ``cancel`` know it."""
    job = os.environ.get("SLURM_JOB_ID")
    if rank != 0 or not job or os.environ.get("SUBMITIT_FOLDER"):  # submitit's jobs: recorded by launch
        return
    from keeltune.launcher.submit import JobRecord, add_record, read_records

    if any(record.job_id == job for record in read_records(run_dir)):
        return
    add_record(
        run_dir,
        JobRecord(
            job_id=job,
            cluster="slurm",
            submitted=float(os.environ.get("SLURM_JOB_START_TIME") or round(time.time() - 60)),
            nodes=config.slurm.nodes,
            tasks_per_node=config.slurm.ranks_per_node,
            folder=str(logs_dir(run_dir)),
            launcher="sbatch",
        ),
    )


def requeue_slurm_job(max_requeues: int) -> str:
    """Put this Slurm job back in the queue (it resumes from the run's latest checkpoint). Returns why it was not
    requeued once ``max_requeues`` is spent (Slurm counts restarts in SLURM_RESTART_COUNT), else ""."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        note = f"not requeued: slurm.max_requeues={max_requeues} is spent (the job was requeued {restarts} time(s))"
        log.error("%s; relaunch the same config to resume from the checkpoint", note)
        return note
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    log.warning("requeued job %s (requeue %d of at most %d)", job, restarts + 1, max_requeues)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keeltune.launcher.entry", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="run folder holding config.yaml")
    args = parser.parse_args(argv)
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:  # a task of the rendered sbatch script
        from keeltune.distributed import slurm_task_environment

        os.environ.update(slurm_task_environment())
    from keeltune.distributed import stop_with_launcher

    stop = StopRequest().install()
    stop_with_launcher()  # after the handler: the launcher's death then stops this rank cleanly
    try:
        summary = train_rank(args.run_dir.resolve(), stop)
    except (ConfigError, DataError, CheckpointError) as err:
        if not log.handlers:  # failed before the rank's log existed (else the message is there and on stderr)
            print(f"error: {err}", file=sys.stderr)
        return 2
    return STOPPED_EXIT if summary.stopped else 0


if __name__ == "__main__":
    from keeltune.distributed import exit_rank

    exit_rank(main())
