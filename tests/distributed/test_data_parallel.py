"""Plain data parallel over 2 real gloo processes (torch's launcher, DataLoader workers reading ahead) equals
1 process reading in-process on the same global batch."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import (
    DDP_RUN_STEPS,
    SharedRun,
    ddp_run_config,
    keeltune,
    read_metrics,
    train_losses,
    write_config,
)


def test_two_ranks_match_one_rank_and_log_per_rank(assets: dict, ddp_run: SharedRun, tmp_path: Path) -> None:
    """1 process: the session's ddp run (tests/conftest.py, 6 steps, evaluated and checkpointed at 3 and 6); 2
    ranks: the same config, but each rank reads through a DataLoader worker."""
    config = ddp_run_config(assets, tmp_path / "runs")
    config["run"]["name"] = "ranks2"
    config["data"]["loader_workers"] = 1
    done = keeltune("train", str(write_config(tmp_path / "cfg2.yaml", config)), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {1: ddp_run.run_dir, 2: tmp_path / "runs" / "ranks2"}
    saved = {n: yaml.safe_load((runs[n] / "config.yaml").read_text())["data"] for n in runs}
    assert (saved[1]["loader_workers"], saved[2]["loader_workers"]) == (0, 1)  # in-process vs a worker
    one, two = train_losses(runs[1]), train_losses(runs[2])
    assert sorted(one) == sorted(two) == list(range(1, DDP_RUN_STEPS + 1))
    # equal within 1e-6, not to the bit: 2 ranks sum each step's gradient in another order than 1 rank (each
    # rank's micro-batches, then the all-reduce). Seen: losses within 1.2e-7, weights within 2.7e-7.
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-6, (step, one[step], two[step])
    reference, weights = (
        load_file(runs[1] / "final" / "model.safetensors"),
        load_file(runs[2] / "final" / "model.safetensors"),
    )
    for name in reference:
        assert torch.allclose(reference[name], weights[name], atol=1e-6, rtol=0), name
    # and so are the evaluations (sharded over the 2 ranks), before training and after
    evals = {n: [r for r in read_metrics(runs[n]) if "val/loss" in r] for n in runs}
    half = DDP_RUN_STEPS // 2
    assert [r["step"] for r in evals[1]] == [r["step"] for r in evals[2]] == [0, half, DDP_RUN_STEPS]
    for expected, got in zip(evals[1], evals[2], strict=True):
        for key in (k for k in expected if k.endswith("/loss")):
            assert abs(got[key] - expected[key]) <= 1e-6, (expected["step"], key, got[key], expected[key])
    rank1_log = (runs[2] / "logs" / "rank1.log").read_text()
    assert "[rank1/" in rank1_log
    assert "[rank0/" in (runs[2] / "logs" / "rank0.log").read_text()
