"""The real local Slurm cluster (slurm/local-cluster/), started once per session for the tests that use it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics

CLUSTER_SCRIPTS = REPO / "slurm" / "local-cluster"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


@dataclass(frozen=True)
class LocalSlurm:
    """A running local cluster: its state folder and the environment its client commands need."""

    state_dir: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, squeue, sacct, ...) against this cluster."""
        done = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def sbatch(self, *args: str) -> int:
        """Submit a batch job; return its id."""
        return int(self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0])

    def sacct_state(self, job_id: int) -> str:
        """The job's state as accounting knows it (``CANCELLED by 0`` -> ``CANCELLED``); "" when not yet known."""
        out = self.run(
            "sacct", "--noheader", "--allocations", "--parsable2", "-j", str(job_id), "-o", "State"
        )
        return out.stdout.strip().split(" ")[0] if out.stdout.strip() else ""

    def squeue_state(self, job_id: int) -> str:
        """The job's state in the controller (PENDING, RUNNING, ...); "" once it has left the queue."""
        out = self.run("squeue", "--noheader", "-j", str(job_id), "-o", "%T", check=False)
        return out.stdout.strip()

    def release_requeued(self, job_id: int) -> None:
        """Let a requeued job (held by Slurm for its credential lifetime) start in 2 s rather than minutes.

        Not ``StartTime=now``: slurmd refuses a job whose new credential is dated the same second as the old
        instance's kill ("Job credential revoked", the job ends FAILED); Slurm's own hold exists for that."""
        self.wait_for_state(job_id, {"PENDING"}, timeout=120, source="squeue")
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now+2")

    def wait_for_state(
        self, job_id: int, states: set[str], timeout: float = 30, source: str = "sacct"
    ) -> str:
        """Poll until the job's state (from ``sacct`` or ``squeue``) is one of ``states``; return it."""
        read = self.sacct_state if source == "sacct" else self.squeue_state
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = read(job_id)
            if state in states or (source == "sacct" and state in TERMINAL_STATES):
                return state
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} is {state or 'unknown'} after {timeout} s, expected {states}")


def start_cluster() -> str:
    """Install (when missing) and start the local cluster; both scripts are idempotent. Returns their output."""
    output = []
    for script, timeout in (("install.sh", 600), ("start.sh", 180)):
        done = subprocess.run(
            ["bash", str(CLUSTER_SCRIPTS / script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output.append(done.stdout + done.stderr)
        if done.returncode != 0:
            pytest.fail(f"slurm/local-cluster/{script} failed:\n{''.join(output)}", pytrace=False)
    return "".join(output)


@pytest.fixture(scope="session")
def slurm_cluster() -> LocalSlurm:
    """The local cluster, started if needed. Also exports SLURM_CONF into this process (submitit reads it)."""
    start_cluster()
    state_dir = Path(os.environ.get("KEELTUNE_SLURM_DIR", "/var/tmp/keeltune-slurm"))
    os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
    return LocalSlurm(state_dir=state_dir, env=dict(os.environ))


def launched_job_id(run_dir: Path) -> str:
    """The id of the latest job ``keeltune launch`` submitted for a run folder."""
    return json.loads((run_dir / "jobs.json").read_text())[-1]["job_id"]


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    """Until the run has logged a training step at or after ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(
            r.get("step", 0) >= step and "train/loss" in r for r in read_metrics(run_dir)
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} never logged step {step}")


def task_pid(job: str, rank: int) -> int:
    """The process of one task (rank) of a job, found by its Slurm environment."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            b"submitit.core._submit" in cmdline
            and f"SLURM_JOB_ID={job}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
        ):
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank} of job {job}")
