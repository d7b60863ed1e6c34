"""A script rendered by ``keeltune sbatch`` and submitted with plain ``sbatch`` trains on 2 real Slurm nodes;
hostile names in the config never run as shell code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import base_config, keeltune, train_losses, write_config
from tests.slurm.conftest import LocalSlurm

pytestmark = pytest.mark.slurm

EVIL = "$(touch CANARY)`touch CANARY`; touch CANARY 'q\" x"


def test_rendered_script_runs_two_nodes_and_quotes_everything(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    root = tmp_path / f"runs {EVIL}"
    config = base_config(
        assets,
        root,
        run={"name": "sbatch-run", "root": str(root)},
        training={"max_steps": 4, "warmup_steps": 1, "checkpoint": {"every_steps": 2, "keep_last": 1}},
        eval={"every_steps": 2, "micro_batch_size": 8},
    )
    config["slurm"] = {
        "nodes": 2,
        "gpus_per_node": 2,  # 2 ranks per node: rank r must run on node r // 2
        "time": "5",
        "mem": "3000M",
        "cpus_per_task": 1,
        "job_name": f"job {EVIL}",
        "env": [f"KEELTUNE_NOTE={EVIL}", "OMP_NUM_THREADS=1"],
        "setup": ["echo setup line ran"],
    }
    script = tmp_path / "job.sbatch"
    rendered = keeltune(
        "sbatch", str(write_config(tmp_path / "cfg.yaml", config)), "-o", str(script), cwd=tmp_path
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "submit with: sbatch" in rendered.stdout
    submitted = slurm_cluster.run("sbatch", str(script), timeout=30)
    job = int(re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1))
    run_dir = root / "sbatch-run"
    state = slurm_cluster.wait_for_state(job, {"COMPLETED"}, timeout=240)
    log = next((run_dir / "logs").glob("slurm-*.out")).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "setup line ran" in log
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert_ranks_on_their_nodes(slurm_cluster, job, run_dir, nodes=2, ranks_per_node=2)
    status = keeltune("status", str(run_dir))  # the job recorded itself in the run folder
    assert f"job          {job} (slurm, sbatch script): COMPLETED" in status.stdout, (
        status.stdout + status.stderr
    )
    assert not [p for p in tmp_path.rglob("CANARY")], "a config value ran as shell code"
    assert not Path("CANARY").exists()


def assert_ranks_on_their_nodes(
    cluster: LocalSlurm, job: int, run_dir: Path, *, nodes: int, ranks_per_node: int
) -> None:
    """Rank r ran on node r // ranks_per_node of the job's node list (Slurm's block layout), as its record
    (``logs/rank<R>.json``: ``SLURMD_NODENAME`` of the task) and every line of its log say."""
    node_list = cluster.run("sacct", "-X", "-n", "-P", "-j", str(job), "-o", "NodeList").stdout.strip()
    hosts = cluster.run("scontrol", "show", "hostnames", node_list).stdout.split()
    assert len(hosts) == nodes, (node_list, hosts)
    world_size = nodes * ranks_per_node
    records = sorted(p.name for p in (run_dir / "logs").glob("rank*.json"))
    assert records == sorted(f"rank{r}.json" for r in range(world_size))
    for rank in range(world_size):
        expected = hosts[rank // ranks_per_node]
        record = json.loads((run_dir / "logs" / f"rank{rank}.json").read_text())
        assert (record["rank"], record["world_size"], record["job"]) == (rank, world_size, str(job)), record
        assert record["node"] == expected and record["outcome"] == "finished", (rank, hosts, record)
        prefixes = set(
            re.findall(r"\[rank(\d+)/([^\]]+)\]", (run_dir / "logs" / f"rank{rank}.log").read_text())
        )
        assert prefixes == {(str(rank), expected)}, (rank, hosts, prefixes)


def test_rendered_script_checkpoints_requeues_and_resumes_on_usr2(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    import json
    import time

    from tests.conftest import read_metrics

    steps = 12
    root = tmp_path / "runs"
    config = base_config(
        assets,
        root,
        run={"name": "requeued", "root": str(root)},
        training={"max_steps": steps, "warmup_steps": 1, "checkpoint": {"every_steps": 6, "keep_last": 1}},
        eval={"every_steps": 6, "micro_batch_size": 8},
    )
    config["slurm"] = {
        "nodes": 2,
        "gpus_per_node": 1,
        "time": "10",
        "mem": "3000M",
        "env": ["OMP_NUM_THREADS=1"],
    }
    script = tmp_path / "job.sbatch"
    assert (
        keeltune("sbatch", str(write_config(tmp_path / "cfg.yaml", config)), "-o", str(script)).returncode
        == 0
    )
    assert "#SBATCH --signal=USR2@120" in script.read_text()
    job = slurm_cluster.sbatch(str(script))
    run_dir = root / "requeued"
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file() or not any(
        "train/loss" in r for r in read_metrics(run_dir)
    ):
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR2", str(job))
    slurm_cluster.release_requeued(job)
    state = slurm_cluster.wait_for_state(job, {"COMPLETED"}, timeout=300)
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert state == "COMPLETED", rank0[-3000:]
    assert f"requeued job {job}" in rank0 and "resumed from" in rank0
    assert sorted(train_losses(run_dir)) == list(range(1, steps + 1))  # each step once
    final = json.loads((run_dir / "checkpoints" / f"step_{steps:07d}" / "trainer_state.json").read_text())
    assert final["data"]["consumed_samples"] == steps * 8  # no sample repeated or skipped
