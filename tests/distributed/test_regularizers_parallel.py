"""KL to the base, L2-SP and EWC through the real CLI: logged every step, and 2 gloo ranks give the same task
loss, penalties and Fisher as 1 rank (penalties are added once per optimizer step, after the gradient reduction),
also under 2-rank ZeRO-3, where parameters, gradients, anchors and the Fisher are partitioned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keeltune.training.regularizers.ewc import FISHER_FILE
from tests.conftest import base_config, keeltune, read_metrics, write_config

PENALTIES = {
    "ddp": {
        "kl": {"weight": 1.0, "temperature": 2.0},
        "l2sp": {"weight": 0.5},
        "ewc": {"weight": 100.0, "samples": 8},
    },
    "qlora": {
        "kl": {"weight": 1.0, "temperature": 2.0},
        "l2sp": {"weight": 50.0},
    },  # EWC is refused under qlora
}
PENALTIES["zero3"] = PENALTIES["ddp"]


def zero3_fisher(run_dir: Path, shapes: dict[str, torch.Size], world: int) -> dict[str, torch.Tensor]:
    """The whole Fisher from each rank's slices (flat, the last one padded)."""
    parts = [load_file(run_dir / f"ewc_fisher-rank{r:05d}-of-{world:05d}.safetensors") for r in range(world)]
    return {
        name: torch.cat([p[name].reshape(-1) for p in parts])[: shape.numel()].reshape(shape)
        for name, shape in shapes.items()
    }


@pytest.mark.parametrize("backend", ["ddp", "qlora", "zero3"])
def test_penalties_on_two_ranks_match_one_rank(assets: dict, tmp_path: Path, backend: str) -> None:
    """zero3: 2 ZeRO-3 ranks against 1 plain process (ddp); the others: 2 ranks against 1 of the same backend."""
    runs = {}
    for nproc in (1, 2):
        one_rank_backend = "ddp" if backend == "zero3" and nproc == 1 else backend
        sharding = {
            "backend": one_rank_backend,
            **({"qlora": {"dropout": 0.0}} if backend == "qlora" else {}),
        }
        config = base_config(
            assets,
            tmp_path / "runs",
            run={"name": f"reg{nproc}", "root": str(tmp_path / "runs")},
            training={"max_steps": 4, "warmup_steps": 1, "checkpoint": {"every_steps": 4, "keep_last": 1}},
            eval={"every_steps": 4, "micro_batch_size": 8, "at_start": False},
            sharding=sharding,
            regularization=PENALTIES[backend],
        )
        # tokenize inline: a forked tokenizer pool under a live gloo group was seen to deadlock on this machine
        config["data"]["prepare_workers"] = 1
        done = keeltune(
            "train", str(write_config(tmp_path / f"cfg{nproc}.yaml", config)), "--nproc", str(nproc)
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = {
            r["step"]: r for r in read_metrics(tmp_path / "runs" / f"reg{nproc}") if "train/loss" in r
        }
    one, two = runs[1], runs[2]
    keys = ["train/loss", *(f"train/{name}" for name in PENALTIES[backend])]
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for name in PENALTIES[backend]:  # measured before each step's update: zero at the pretrained weights
        assert one[1][f"train/{name}"] < 1e-6 and one[4][f"train/{name}"] > 1e-6, name
    worst = max(abs(one[s][k] - two[s][k]) for s in one for k in keys)
    print(f"{backend}: largest 1-rank vs 2-rank difference over {keys}: {worst:.2e}")
    for step in one:
        for key in keys:
            assert abs(one[step][key] - two[step][key]) < 1e-5, (step, key, one[step][key], two[step][key])
    if backend in ("ddp", "zero3"):
        one_rank = load_file(tmp_path / "runs" / "reg1" / FISHER_FILE)
        two_ranks = (
            zero3_fisher(tmp_path / "runs" / "reg2", {n: t.shape for n, t in one_rank.items()}, 2)
            if backend == "zero3"
            else load_file(tmp_path / "runs" / "reg2" / FISHER_FILE)
        )
        assert one_rank.keys() == two_ranks.keys()
        assert sum(float(t.sum()) for t in one_rank.values()) > 0
        for name, tensor in one_rank.items():
            torch.testing.assert_close(two_ranks[name], tensor, rtol=1e-5, atol=1e-9, msg=name)
