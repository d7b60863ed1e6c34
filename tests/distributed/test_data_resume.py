"""The real CLI: ``keeltune prepare`` into a shared folder, then a mixed 2-rank run killed mid-epoch and resumed
on 3 ranks takes exactly the steps of an uninterrupted 1-rank run (so it read the same samples).

Strict about the resume: the kill must land before the last step (no ``final/``, no last checkpoint, fewer
train records than max_steps), the resumed attempt must say it resumed from the newest checkpoint the killed
one left and log only the steps after it, and its final weights must equal the uninterrupted run's."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import base_config, keeltune, read_metrics, train_losses, write_config
from tests.processes import kill_tree, start_training

STEPS, GLOBAL_BATCH = 6, 12
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+), (\d+) samples consumed\)")
PROGRESS = re.compile(rf"\bstep (\d+)/{STEPS}\b")
# Not to the bit, and not within 1e-6: the uninterrupted run has 1 rank, the killed one 2 and then 3, so each
# step's gradient is summed in another order (micro-batches on a rank, then the all-reduce over ranks) and
# differs in the last float32 bits; Adam turns that into weight differences that grow with the steps. Seen on
# this tiny model after 6 steps: losses (about 6, where one float32 ulp is 4.8e-7) within 4.6e-7, weights
# within 3.1e-6 element-wise and 1.5e-6 relative in norm (mlp.down_proj). A resume that restored the wrong
# samples, weights or optimizer state is off by 1e-3 or more (lr 3e-3).
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-5  # element-wise
WEIGHT_RTOL = 1e-5  # of the tensor's norm


def mixed_config(assets: dict, tmp_path: Path, name: str) -> dict:
    config = base_config(
        assets,
        tmp_path / "runs",
        run={"name": name, "root": str(tmp_path / "runs")},
        training={
            "max_steps": STEPS,
            "global_batch_size": GLOBAL_BATCH,
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


def _checkpoint_steps(run_dir: Path) -> list[int]:
    folders = (run_dir / "checkpoints").glob("step_*")
    return sorted(int(p.name[5:]) for p in folders if re.fullmatch(r"step_\d+", p.name))


def assert_same_weights(reference: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Every tensor within WEIGHT_ATOL of the reference element-wise and within WEIGHT_RTOL of its norm (an
    element-wise relative test means nothing for weights near zero)."""
    assert reference.keys() == weights.keys()
    for name, expected in reference.items():
        got = weights[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        difference = got.double() - expected.double()
        assert float(difference.abs().max()) <= WEIGHT_ATOL, (name, float(difference.abs().max()))
        relative = float(difference.norm() / expected.double().norm())
        assert relative <= WEIGHT_RTOL, (name, relative)


def test_prepare_then_kill_two_ranks_and_resume_on_three(assets: dict, tmp_path: Path) -> None:
    straight = write_config(tmp_path / "straight.yaml", mixed_config(assets, tmp_path, "straight"))
    prepared = keeltune("prepare", str(straight))
    assert prepared.returncode == 0, prepared.stderr
    assert "data.train.1: prepared" in prepared.stdout and (tmp_path / "prepared" / "train-replay").is_dir()
    assert keeltune("prepare", str(straight)).stdout.count(": current") == 3  # nothing to do twice
    done = keeltune("train", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    straight_dir = tmp_path / "runs" / "straight"
    assert "resumed from" not in (straight_dir / "logs" / "rank0.log").read_text()

    killed = write_config(tmp_path / "killed.yaml", mixed_config(assets, tmp_path, "killed"))
    run_dir = tmp_path / "runs" / "killed"
    process = start_training(killed, 2)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step_0000002").is_dir():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    # every rank, mid-epoch: the ranks run in sessions of their own, a killpg of the CLI would leave them
    # training on (they then finished the run before the "resume", which passed without resuming anything)
    killed_pids = kill_tree(process)
    assert process.returncode == -signal.SIGKILL, process.returncode  # killed, not finished
    assert len(killed_pids) >= 4, killed_pids  # the CLI, torch's launcher and the 2 ranks

    # the killed attempt stopped before the end: what it left is what a resume must continue from
    assert not (run_dir / "final").exists()
    left = _checkpoint_steps(run_dir)
    assert left and 2 <= left[-1] < STEPS, left
    logged_before = sorted(train_losses(run_dir))
    assert logged_before and logged_before[-1] < STEPS, logged_before
    log_file = run_dir / "logs" / "rank0.log"
    killed_log = log_file.read_text()
    assert "resumed from" not in killed_log
    records_before = read_metrics(run_dir)

    resumed = keeltune("train", str(killed), "--nproc", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full_log = log_file.read_text()
    assert full_log.startswith(killed_log)  # the log is appended to: the rest is the resumed attempt's
    resumed_log = full_log[len(killed_log) :]
    found = RESUMED.findall(resumed_log)
    assert len(found) == 1, resumed_log[-3000:]
    folder, step, consumed = found[0][0], int(found[0][1]), int(found[0][2])
    assert step == left[-1] and Path(folder).name == f"step_{step:07d}", (found, left)
    assert consumed == step * GLOBAL_BATCH
    # the resumed attempt trained exactly the steps after the checkpoint, and no step before it again
    assert sorted(int(s) for s in PROGRESS.findall(resumed_log)) == list(range(step + 1, STEPS + 1))

    expected, got = train_losses(straight_dir), train_losses(run_dir)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    for n in range(1, STEPS + 1):
        assert abs(got[n] - expected[n]) <= LOSS_ATOL, (n, got[n], expected[n])
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    assert kept == [r for r in records_before if r["step"] <= step]  # the killed attempt's, untouched
    reference = load_file(straight_dir / "final" / "model.safetensors")
    assert_same_weights(reference, load_file(run_dir / "final" / "model.safetensors"))
    last = [r for r in read_metrics(run_dir) if "train/loss" in r][-1]
    assert last["step"] == STEPS
    assert abs(last["data/task/fraction"] - 0.8) <= 1 / 72  # 72 samples: within one sample of 80%
    assert last["data/task/fraction"] + last["data/replay/fraction"] == 1.0
