"""What a cluster does to jobs, on the real local cluster: a cancel with W&B on checkpoints the step reached and
the resume continues from it; status tells a clean stop from a failure and names a rank that fell silent before
the ones that followed; a partition without GPUs whose node names do not resolve runs through Slurm's node
addresses, and sbatch's refusals come back as config errors."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import base_config, keeltune, train_losses, wandb_history, write_config
from tests.slurm.conftest import LocalSlurm, launched_job_id, task_pid, wait_for_step

pytestmark = pytest.mark.slurm


def reliability_config(assets: dict, root: Path, name: str, steps: int = 400) -> dict:
    """ddp, checkpoints only when stopped (every_steps above max_steps), short timeouts for failure tests."""
    config = base_config(
        assets,
        root,
        run={"name": name, "root": str(root)},
        training={
            "max_steps": steps,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": 10_000, "keep_last": 1},
            "collective_timeout_s": 10,
            "preflight_timeout_s": 10,
        },
        eval={"every_steps": 10_000, "micro_batch_size": 8, "at_start": False},
    )
    config["slurm"] = {"time": "10", "mem": "3000M", "env": ["OMP_NUM_THREADS=1"], "max_requeues": 1}
    return config


def test_cancel_with_w_and_b_offline_checkpoints_the_step_reached_and_the_resume_continues_from_it(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    steps = 100
    config = reliability_config(assets, tmp_path / "runs", "cancelled", steps=steps)
    config["logging"] = {"wandb": {"mode": "offline", "project": "cancel-test"}}
    cfg = write_config(tmp_path / "cfg.yaml", config)
    run_dir = tmp_path / "runs" / "cancelled"
    launched = keeltune("launch", str(cfg), "--nodes", "1", "--gpus-per-node", "2")
    assert launched.returncode == 0, launched.stderr[-3000:]
    job = launched_job_id(run_dir)
    wait_for_step(run_dir, 3)
    cancelled = keeltune("cancel", str(run_dir))
    assert cancelled.returncode == 0 and f"cancelled job {job}" in cancelled.stdout
    assert slurm_cluster.wait_for_state(int(job), {"CANCELLED"}, timeout=60) == "CANCELLED"
    reached = max(train_losses(run_dir))
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert reached < steps, rank0[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{reached:07d}"], rank0[-3000:]
    for rank in (0, 1):
        assert "received SIGTERM" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    status = keeltune("status", str(run_dir)).stdout
    assert (
        f"stopped      cleanly at step {reached} after checkpointing, every rank (received SIGTERM)" in status
    )
    assert "failure" not in status and "cause" not in status, status

    relaunched = keeltune("launch", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--wait", timeout=300)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert f"resuming from step_{reached:07d}" in relaunched.stdout
    assert sorted(train_losses(run_dir)) == list(range(1, steps + 1))  # continued at the next step
    assert (
        f"resumed from {run_dir / 'checkpoints' / f'step_{reached:07d}'}"
        in (run_dir / "logs" / "rank0.log").read_text()
    )
    run_id = (run_dir / "wandb_run_id").read_text()
    first, resumed = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    # Slurm signals W&B's service process too, so what it had not written when the TERM came is missing from
    # the first attempt (metrics.jsonl has every record); the resumed attempt continues at the run's own step
    after = [
        int(r["trainer/step"]) for r in wandb_history(resumed / f"run-{run_id}.wandb") if "train/loss" in r
    ]
    assert after == list(range(reached + 1, steps + 1))


def test_a_rank_that_falls_silent_is_named_first_and_the_rank_that_followed_second(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", reliability_config(assets, tmp_path / "runs", "silent"))
    run_dir = tmp_path / "runs" / "silent"
    assert keeltune("launch", str(cfg), "--nodes", "2", "--gpus-per-node", "1").returncode == 0
    job = launched_job_id(run_dir)
    wait_for_step(run_dir, 2)
    stopped = task_pid(job, 1)
    os.kill(stopped, signal.SIGSTOP)  # alive, but never answers again
    try:
        assert slurm_cluster.wait_for_state(int(job), {"FAILED"}, timeout=120) == "FAILED"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    status = keeltune("status", str(run_dir)).stdout
    lines = [line for line in status.splitlines() if line.startswith(("cause", "followed"))]
    assert (
        lines[0].startswith("cause        rank 1 on n") and "fell silent (its last heartbeat" in lines[0]
    ), status
    assert lines[1].startswith("followed     rank 0 on n") and "failed at step" in lines[1], status
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "rank 0 failed:" in rank0 and "rank 1 on n" in rank0 and "fell silent (its last heartbeat" in rank0
    assert "Traceback" in rank0  # the fatal error is in the rank's own log, not only in the job's stderr


def test_a_partition_without_gpus_whose_node_names_do_not_resolve_runs_two_nodes(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    for node in ("nodns1", "nodns2"):  # like a cluster whose node names are not in DNS
        with pytest.raises(OSError):
            socket.getaddrinfo(node, None)
    config = reliability_config(assets, tmp_path / "runs", "nodns", steps=4)
    config["slurm"].update(partition="cpu", gpus_per_node=0, ntasks_per_node=1)
    cfg = write_config(tmp_path / "cfg.yaml", config)
    refused = keeltune("launch", str(cfg), "--gpus-per-node", "1")
    assert refused.returncode == 2 and "sbatch refused the job" in refused.stderr, refused.stderr[-2000:]
    assert "slurm.gpus_per_node: 0" in refused.stderr and "Traceback" not in refused.stderr
    done = keeltune("launch", str(cfg), "--nodes", "2", "--wait", timeout=300)
    run_dir = tmp_path / "runs" / "nodns"
    assert done.returncode == 0, done.stderr[-3000:] + (run_dir / "logs" / "rank0.log").read_text()[-3000:]
    assert "2 node(s) x 1 CPU rank(s)" in done.stdout
    slurm_cluster.wait_for_state(int(launched_job_id(run_dir)), {"COMPLETED"}, timeout=60)  # the script ends
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert "[rank1/nodns2]" in (run_dir / "logs" / "rank1.log").read_text()
    status = keeltune("status", str(run_dir)).stdout
    assert "COMPLETED" in status and "failure" not in status and "cause" not in status, status
    assert f"finished     every rank, at step {4}" in status


def test_no_address_for_the_first_node_is_an_error_naming_it(slurm_cluster: LocalSlurm) -> None:
    from keeltune.distributed import master_address

    assert master_address("nodns1") == "127.0.0.1"  # NodeAddr, from Slurm
    assert master_address("n1") == "n1"  # a name that resolves is used as it is
    with pytest.raises(RuntimeError, match="'no-such-node-kt'.*does not resolve.*no NodeAddr"):
        master_address("no-such-node-kt")
