"""The local test cluster is a real Slurm: four idle nodes, multi-node jobs with srun, GPU GRES, accounting."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import CLUSTER_SCRIPTS, LocalSlurm

pytestmark = pytest.mark.slurm

NODES = ["n1", "n2", "n3", "n4"]


def _node_table(cluster: LocalSlurm) -> dict[str, tuple[str, ...]]:
    out = cluster.run("sinfo", "--noheader", "--Node", "--partition=debug", "--format=%N|%t|%c|%m|%G").stdout
    return {fields[0]: tuple(fields[1:]) for fields in (line.split("|") for line in out.split())}


def _wait_all_idle(cluster: LocalSlurm, timeout: float = 30) -> dict[str, tuple[str, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        table = _node_table(cluster)
        if sorted(table) == NODES and all(row[0] == "idle" for row in table.values()):
            return table
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes not all idle after {timeout} s: {table}")
        time.sleep(0.2)


def test_four_idle_nodes_with_two_gpus_each(slurm_cluster: LocalSlurm) -> None:
    table = _wait_all_idle(slurm_cluster)
    assert table == {node: ("idle", "2", "4000", "gpu:2") for node in NODES}


def test_two_node_job_runs_one_task_per_node(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
        "--wrap", 'srun bash -c "echo rank \\$SLURM_PROCID node \\$SLURM_NODEID \\$SLURMD_NODENAME of \\$SLURM_NTASKS"',
    )  # fmt: skip
    assert slurm_cluster.wait_for_state(job, {"COMPLETED"}) == "COMPLETED", out.read_text()
    lines = sorted(line.split() for line in out.read_text().splitlines() if line.startswith("rank "))
    assert [(f[1], f[3], f[6]) for f in lines] == [("0", "0", "2"), ("1", "1", "2")]
    assert lines[0][4] != lines[1][4] and {lines[0][4], lines[1][4]} <= set(NODES)
    nnodes = slurm_cluster.run("sacct", "-nXP", "-j", str(job), "-o", "NNodes").stdout.strip()
    assert nnodes == "2"


def test_gpus_are_scheduled_counted_and_accounted(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    out = tmp_path / "gpu.out"
    job = slurm_cluster.sbatch(
        "-N", "1", "--gpus-per-node=2", "--time=2", f"--output={out}",
        "--wrap", "echo gpus $SLURM_GPUS_ON_NODE visible $CUDA_VISIBLE_DEVICES",
    )  # fmt: skip
    assert slurm_cluster.wait_for_state(job, {"COMPLETED"}) == "COMPLETED", out.read_text()
    assert "gpus 2 visible 0,1" in out.read_text()
    tres = slurm_cluster.run("sacct", "-nXP", "-j", str(job), "-o", "AllocTRES").stdout
    assert "gres/gpu=2" in tres
    # the count is real: a node has two, so three per node can never run
    refused = slurm_cluster.run("sbatch", "-N", "1", "--gpus-per-node=3", "--wrap", "true", check=False)
    assert refused.returncode != 0
    assert "Requested node configuration is not available" in refused.stderr


def test_cancelled_job_is_cancelled_in_sacct(slurm_cluster: LocalSlurm) -> None:
    job = slurm_cluster.sbatch("-N", "1", "--time=2", "--output=/dev/null", "--wrap", "sleep 300")
    slurm_cluster.wait_for_state(job, {"RUNNING"}, source="squeue")
    slurm_cluster.run("scancel", str(job))
    assert slurm_cluster.wait_for_state(job, {"CANCELLED"}) == "CANCELLED"


def test_start_is_idempotent_and_revives_dead_daemons(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    start = ["bash", str(CLUSTER_SCRIPTS / "start.sh")]
    again = subprocess.run(start, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "all daemons were running" in again.stdout, again.stdout

    # a crashed node and a crashed accounting database; captured output also proves that no daemon
    # keeps start.sh's stdout open (subprocess.run would wait for it until the timeout)
    run_dir = slurm_cluster.state_dir / "run"
    for pid_file in ("slurmd-n4.pid", "mariadb.pid"):
        os.kill(int((run_dir / pid_file).read_text()), signal.SIGKILL)
    revived = subprocess.run(start, capture_output=True, text=True, timeout=60, check=False)
    assert revived.returncode == 0, revived.stdout + revived.stderr
    started = [line for line in revived.stdout.splitlines() if "slurm cluster: started " in line]
    assert started == ["slurm cluster: started mariadb slurmd-n4"], revived.stdout
    _wait_all_idle(slurm_cluster)
    job = slurm_cluster.sbatch("-w", "n4", "--time=1", f"--output={tmp_path / 'n4.out'}", "--wrap", "true")
    assert slurm_cluster.wait_for_state(job, {"COMPLETED"}) == "COMPLETED"
