"""``keeltune launch`` through submitit on the real local Slurm cluster: 1- and 2-node ZeRO-3 jobs, preemption
through Slurm itself (USR2 -> checkpoint -> requeue -> exact resume), at most slurm.max_requeues requeues, cancel,
and a killed rank that fails the job fast with the rank named."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import base_config, keeltune, train_losses, write_config
from tests.slurm.conftest import TERMINAL_STATES, LocalSlurm, launched_job_id, task_pid, wait_for_step

pytestmark = pytest.mark.slurm

STEPS = 12


def launch_config(assets: dict, root: Path, name: str, backend: str = "zero3", steps: int = STEPS) -> dict:
    config = base_config(
        assets,
        root,
        run={"name": name, "root": str(root)},
        training={
            "max_steps": steps,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": 6, "keep_last": 1},
        },
        eval={"every_steps": 6, "micro_batch_size": 8},
        sharding={"backend": backend},
    )
    config["slurm"] = {"time": "10", "mem": "3000M", "env": ["OMP_NUM_THREADS=1"], "max_requeues": 2}
    return config


@pytest.fixture(scope="module")
def one_node(slurm_cluster: LocalSlurm, assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted ZeRO-3 job: 1 node, 2 ranks."""
    root = tmp_path_factory.mktemp("launch")
    cfg = write_config(root / "one.yaml", launch_config(assets, root / "runs", "one"))
    done = keeltune("launch", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--wait", timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "submitted job" in done.stdout and "run folder" in done.stdout
    run_dir = root / "runs" / "one"
    slurm_cluster.wait_for_state(
        int(launched_job_id(run_dir)), {"COMPLETED"}, timeout=60
    )  # the batch script ends
    return run_dir


def test_a_one_node_job_finishes_and_its_checkpoint_exports(one_node: Path, tmp_path: Path) -> None:
    assert sorted(train_losses(one_node)) == list(range(1, STEPS + 1))
    status = keeltune("status", str(one_node))
    assert (
        status.returncode == 0 and "COMPLETED" in status.stdout and f"step {STEPS}/{STEPS}" in status.stdout
    )
    exported = keeltune("export", str(one_node), "--out", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    logs = keeltune("logs", str(one_node), "--rank", "1")
    assert "[rank1/n" in logs.stdout
    beyond = keeltune("logs", str(one_node), "--rank", "7")
    assert beyond.returncode == 2 and "this run has 2 rank(s), 0 to 1" in beyond.stderr
    cancelled = keeltune("cancel", str(one_node))
    assert cancelled.returncode == 1 and "already ended (COMPLETED): nothing to cancel" in cancelled.stderr


def test_usr2_from_slurm_checkpoints_requeues_and_resumes_exactly_on_two_nodes(
    slurm_cluster: LocalSlurm, one_node: Path, assets: dict, tmp_path: Path
) -> None:
    cfg = launch_config(assets, tmp_path / "runs", "preempted")
    cfg["logging"] = {"wandb": {"mode": "offline"}}
    launched = keeltune(
        "launch", str(write_config(tmp_path / "p.yaml", cfg)), "--nodes", "2", "--gpus-per-node", "1"
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dir = tmp_path / "runs" / "preempted"
    job = launched_job_id(run_dir)
    wait_for_step(run_dir, 2)
    slurm_cluster.run("scancel", "--signal=USR2", job)  # what Slurm sends before a time limit
    slurm_cluster.release_requeued(int(job))
    state = slurm_cluster.wait_for_state(int(job), {"COMPLETED"}, timeout=300)
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert state == "COMPLETED", rank0[-3000:]
    assert "received SIGUSR2" in rank0 and f"requeued job {job}" in rank0 and "resumed from" in rank0
    expected, got = train_losses(one_node), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step repeated or skipped
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    final = f"checkpoints/step_{STEPS:07d}/trainer_state.json"
    assert (
        json.loads((run_dir / final).read_text())["data"]
        == json.loads((one_node / final).read_text())["data"]
    )
    reference, weights = (
        load_file(one_node / "final" / "model.safetensors"),
        load_file(run_dir / "final" / "model.safetensors"),
    )
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6, rtol=0) for k in reference)
    run_id = (run_dir / "wandb_run_id").read_text()
    attempts = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2  # both attempts logged to the same W&B run
    status = keeltune("status", str(run_dir)).stdout  # the clean stop of the first attempt is no failure
    assert "COMPLETED" in status and "failure" not in status and "cause" not in status, status
    assert f"finished     every rank, at step {STEPS}" in status


def test_a_killed_rank_fails_the_job_fast_naming_it_and_cancel_works(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "k.yaml", launch_config(assets, tmp_path / "runs", "killed", "ddp", steps=400)
    )
    assert keeltune("launch", str(cfg), "--nodes", "2", "--gpus-per-node", "1").returncode == 0
    run_dir = tmp_path / "runs" / "killed"
    job = launched_job_id(run_dir)
    wait_for_step(run_dir, 1)
    killed_at = time.monotonic()
    import os

    os.kill(task_pid(job, 1), signal.SIGKILL)
    state = slurm_cluster.wait_for_state(int(job), {"FAILED"}, timeout=90)
    assert state == "FAILED" and time.monotonic() - killed_at < 90
    status = keeltune("status", str(run_dir))
    assert "FAILED" in status.stdout and "rank 1 on n" in status.stdout, status.stdout

    cfg = write_config(
        tmp_path / "c.yaml", launch_config(assets, tmp_path / "runs", "cancelled", "ddp", steps=400)
    )
    assert keeltune("launch", str(cfg), "--nodes", "1", "--gpus-per-node", "1").returncode == 0
    run_dir = tmp_path / "runs" / "cancelled"
    job = launched_job_id(run_dir)
    slurm_cluster.wait_for_state(int(job), {"RUNNING"}, timeout=60, source="squeue")
    cancelled = keeltune("cancel", str(run_dir))
    assert cancelled.returncode == 0 and f"cancelled job {job}" in cancelled.stdout
    assert slurm_cluster.wait_for_state(int(job), {"CANCELLED"}, timeout=60) == "CANCELLED"


def test_a_job_is_requeued_at_most_max_requeues_times_then_ends_with_a_message(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    """slurm.max_requeues=1: the first USR2 checkpoints and requeues, the resumed attempt's USR2 checkpoints and
    ends the job (no second requeue), saying why in rank 0's log; status calls it a clean stop to resume."""
    cfg = launch_config(assets, tmp_path / "runs", "requeues", "ddp", steps=100_000)  # never ends by itself
    cfg["training"]["checkpoint"]["every_steps"] = 100_000  # checkpoints only when stopped
    cfg["eval"] = {"every_steps": 100_000, "micro_batch_size": 8, "at_start": False}
    cfg["slurm"]["max_requeues"] = 1
    launched = keeltune(
        "launch", str(write_config(tmp_path / "r.yaml", cfg)), "--nodes", "1", "--gpus-per-node", "1"
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dir = tmp_path / "runs" / "requeues"
    job = launched_job_id(run_dir)
    rank0 = run_dir / "logs" / "rank0.log"
    try:
        wait_for_step(run_dir, 2)
        slurm_cluster.run("scancel", "--signal=USR2", job)
        slurm_cluster.release_requeued(int(job))  # requeue 1 of 1
        first_stop = int(max(run_dir.glob("checkpoints/step_*")).name.removeprefix("step_"))
        wait_for_step(run_dir, first_stop + 1)  # the second attempt resumed and trains
        slurm_cluster.run("scancel", "--signal=USR2", job)
        deadline = time.monotonic() + 120
        while (state := slurm_cluster.sacct_state(int(job))) not in TERMINAL_STATES:
            assert slurm_cluster.squeue_state(int(job)) != "PENDING", (
                "requeued beyond max_requeues\n" + (rank0.read_text()[-3000:])
            )
            assert time.monotonic() < deadline, f"job {job} still {state} 120 s after the second USR2"
            time.sleep(0.2)
    finally:
        slurm_cluster.run("scancel", job, check=False)  # never leave it running (or queued) for other tests
    log = rank0.read_text()
    attempts = slurm_cluster.run("sacct", "-X", "-D", "-n", "-P", "-j", job, "-o", "State").stdout.split()
    assert attempts == ["REQUEUED", state], (attempts, log[-3000:])  # two runs of the job, one requeue
    assert log.count(f"requeued job {job}") == 1 and f"requeued job {job} (requeue 1 of at most 1)" in log
    assert log.count("received SIGUSR2: stopping at the next step boundary") == 2, log[-3000:]
    assert "resumed from" in log
    assert (
        "not requeued: slurm.max_requeues=1 is spent (the job was requeued 1 time(s)); relaunch the same "
        "config to resume from the checkpoint" in log
    ), log[-3000:]
    last = max(train_losses(run_dir))
    assert sorted(train_losses(run_dir)) == list(range(1, last + 1))  # resumed where it stopped
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == [f"step_{last:07d}"]
    record = json.loads((run_dir / "logs" / "rank0.json").read_text())
    assert (record["restart"], record["outcome"], record["step"]) == (1, "stopped", last), record
    status = keeltune("status", str(run_dir)).stdout
    assert (
        f"stopped      cleanly at step {last} after checkpointing, every rank (received SIGUSR2; not requeued: "
        "slurm.max_requeues=1 is spent (the job was requeued 1 time(s))); resume with keeltune launch (same "
        "config)" in status
    ), status
    assert "cause" not in status, status


def test_dry_run_prints_the_script_and_a_memory_estimate_and_submits_nothing(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "d.yaml", launch_config(assets, tmp_path / "runs", "dry"))
    done = keeltune("launch", str(cfg), "--nodes", "2", "--gpus-per-node", "2", "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    for text in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --signal=USR2@",
        "--kill-on-bad-exit=1",
    ):
        assert text in done.stdout, text
    assert "estimated memory per GPU (zero3, 4 rank(s))" in done.stdout and "WARNING" not in done.stdout
    tiny = keeltune("launch", str(cfg), "--dry-run", "--set", "slurm.gpu_memory_gb=0.0001")
    assert "WARNING" in tiny.stdout and "will likely not fit" in tiny.stdout
    assert not (tmp_path / "runs" / "dry" / "jobs.json").exists()
