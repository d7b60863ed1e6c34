"""What a job submitted by ``keeltune launch`` runs on each of its tasks (one task per rank): torch's
distributed variables from Slurm's (or submitit's local) layout, then the same per-rank entry as every launch.

A time-limit warning (USR2, ``slurm.signal_delay_s`` before the limit) or a preemption (TERM) makes every rank
checkpoint at the next step boundary; after USR2 rank 0 requeues the job, which resumes from that checkpoint
and logs to the same W&B run.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import submitit

from keeltune.launcher.entry import STOPPED_EXIT, train_rank
from keeltune.training.stop import StopRequest


def export_distributed_env() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for torch's env:// init."""
    from keeltune.distributed import rendezvous_environment, slurm_task_environment

    if "SLURM_PROCID" in os.environ:
        os.environ.update(slurm_task_environment())
        return
    job = submitit.JobEnvironment()  # submitit's local executor: tasks on this machine
    os.environ.update(
        rendezvous_environment(
            rank=job.global_rank,
            local_rank=job.local_rank,
            world_size=job.num_tasks,
            local_world_size=job.num_tasks // job.num_nodes,
            first_node=job.hostnames[0],
            job_id=str(job.job_id),
        )
    )


def leave_without_finalization(status: int) -> None:
    """End this task with ``status`` once submitit is done with it (it writes the result after the job returns),
    skipping interpreter finalization like every other rank (``exit_rank``): gloo's threads can abort a finished
    rank there, and Slurm then reports the whole job FAILED. An uncaught error still exits 1."""
    from keeltune.distributed import exit_rank

    failed: list[bool] = []
    previous = sys.excepthook

    def note_failure(*details: object) -> None:
        failed.append(True)
        previous(*details)

    sys.excepthook = note_failure
    atexit.register(lambda: exit_rank(1 if failed else status))


class TrainJob:
    """The callable submitit pickles: it only names the run folder, so a requeued job resumes from it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def __call__(self) -> dict[str, object]:
        export_distributed_env()
        stop = StopRequest().install()  # replaces submitit's own handlers: stop at a step boundary instead
        summary = train_rank(self.run_dir, stop)
        if summary.stopped:
            # no result file for a stopped job (submitit must not see it as finished); the exit code says
            # "stopped cleanly after checkpointing" to Slurm and keeltune status
            leave_without_finalization(STOPPED_EXIT)
            raise SystemExit(STOPPED_EXIT)
        leave_without_finalization(0)
        return {
            "steps": summary.steps,
            "final_model": str(summary.final_model),
            "last_eval": summary.last_eval,
            "ended_early": summary.ended_early,
        }
