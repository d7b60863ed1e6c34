"""The real CLI: ``keeltune prepare`` into a shared folder, then a mixed 2-rank run killed mid-epoch and resumed
on 3 ranks takes exactly the steps of an uninterrupted 1-rank run (so it read the same samples)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import base_config, keeltune, read_metrics, train_losses, write_config


def mixed_config(assets: dict, tmp_path: Path, name: str) -> dict:
    config = base_config(
        assets,
        tmp_path / "runs",
        run={"name": name, "root": str(tmp_path / "runs")},
        training={
            "max_steps": 6,
            "global_batch_size": 12,
            "micro_batch_size": 2,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": 2, "keep_last": 1},
        },
        eval={"every_steps": 100, "at_start": False},
    )
    config["data"]["train"] = [
        {"name": "task", "path": str(assets["task"]), "format": "instruction", "weight": 80},
        {"name": "replay", "path": str(assets["general"]), "weight": 20},
    ]
    config["data"]["prepared_dir"] = str(tmp_path / "prepared")
    config["data"].pop("validation")
    return config


def test_prepare_then_kill_two_ranks_and_resume_on_three(assets: dict, tmp_path: Path) -> None:
    straight = write_config(tmp_path / "straight.yaml", mixed_config(assets, tmp_path, "straight"))
    prepared = keeltune("prepare", str(straight))
    assert prepared.returncode == 0, prepared.stderr
    assert "data.train.1: prepared" in prepared.stdout and (tmp_path / "prepared" / "train-replay").is_dir()
    assert keeltune("prepare", str(straight)).stdout.count(": current") == 3  # nothing to do twice
    done = keeltune("train", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = write_config(tmp_path / "killed.yaml", mixed_config(assets, tmp_path, "killed"))
    run_dir = tmp_path / "runs" / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "keeltune.cli", "train", str(killed), "--nproc", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step_0000002").is_dir():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # every rank, mid-epoch
    process.wait()
    resumed = keeltune("train", str(killed), "--nproc", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = train_losses(tmp_path / "runs" / "straight"), train_losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step] - expected[step]) < 1e-5, (step, got[step], expected[step])
    last = [r for r in read_metrics(run_dir) if "train/loss" in r][-1]
    assert abs(last["data/task/fraction"] - 0.8) <= 1 / 72  # 72 samples: within one sample of 80%
    assert last["data/task/fraction"] + last["data/replay/fraction"] == 1.0
