"""What a job submitted by ``keeltune launch`` runs on each of its tasks (one task per GPU): torch's
distributed variables from Slurm's (or submitit's local) layout, then the same per-rank entry as every launch.

A time-limit warning (USR2, ``slurm.signal_delay_s`` before the limit) or a preemption (TERM) makes every rank
checkpoint at the next step boundary; after USR2 rank 0 requeues the job, which resumes from that checkpoint
and logs to the same W&B run.
"""

from __future__ import annotations

import os
from pathlib import Path

import submitit

from keeltune.launcher.entry import train_rank
from keeltune.training.stop import StopRequest


def master_port(job_id: str) -> int:
    """A port per job, the same on every node (also what the rendered sbatch script uses)."""
    digits = "".join(ch for ch in job_id.split("_")[0] if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def export_distributed_env() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for torch's env:// init."""
    job = submitit.JobEnvironment()
    os.environ.update(
        {
            "RANK": str(job.global_rank),
            "LOCAL_RANK": str(job.local_rank),
            "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": str(master_port(str(job.job_id))),
        }
    )


class TrainJob:
    """The callable submitit pickles: it only names the run folder, so a requeued job resumes from it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def __call__(self) -> dict[str, object]:
        export_distributed_env()
        stop = StopRequest().install()  # replaces submitit's own handlers: stop at a step boundary instead
        summary = train_rank(self.run_dir, stop)
        if summary.stopped:
            # no result file for a stopped job: submitit (and `keeltune status`) must not see it as finished
            raise SystemExit(f"stopped after checkpointing at a step boundary: {summary.stopped}")
        return {
            "steps": summary.steps,
            "final_model": str(summary.final_model),
            "last_eval": summary.last_eval,
            "ended_early": summary.ended_early,
        }
