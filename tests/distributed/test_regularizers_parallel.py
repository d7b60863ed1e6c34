"""KL to the base, L2-SP, EWC and counterfactual consistency through the real CLI: logged every step, and 2
gloo ranks give the same task loss, penalties and Fisher as 1 rank (penalties are added once per optimizer step,
after the gradient reduction), also under 2-rank ZeRO-3 and FSDP2, where parameters, gradients, anchors and the Fisher
are partitioned (and consistency's twin forward runs inside the training step)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keeltune.training.regularizers.ewc import FISHER_FILE
from tests.conftest import (
    SharedRun,
    base_config,
    keeltune,
    kept_unchanged,
    read_metrics,
    write_config,
    write_jsonl,
)
from tests.unit.test_consistency import family_records

PENALTIES = {
    "ddp": {
        "kl": {"weight": 1.0, "temperature": 2.0},
        "l2sp": {"weight": 0.5},
        "ewc": {"weight": 100.0, "samples": 8},
        "consistency": {"weight": 1.0},
    },
    "qlora": {
        "kl": {"weight": 1.0, "temperature": 2.0},
        "l2sp": {"weight": 50.0},
        "consistency": {"weight": 1.0},
    },  # EWC is refused under qlora
}
PENALTIES["zero3"] = PENALTIES["fsdp2"] = PENALTIES["ddp"]
ANCHORED = ("kl", "l2sp", "ewc")  # zero at the pretrained weights; consistency is not


def zero3_fisher(run_dir: Path, shapes: dict[str, torch.Size], world: int) -> dict[str, torch.Tensor]:
    """The whole Fisher from each rank's slices (flat, the last one padded)."""
    parts = [load_file(run_dir / f"ewc_fisher-rank{r:05d}-of-{world:05d}.safetensors") for r in range(world)]
    return {
        name: torch.cat([p[name].reshape(-1) for p in parts])[: shape.numel()].reshape(shape)
        for name, shape in shapes.items()
    }


def fsdp2_fisher(run_dir: Path, world: int) -> dict[str, torch.Tensor]:
    """The whole Fisher from each rank's rows (dim 0)."""
    parts = [load_file(run_dir / f"ewc_fisher-rank{r:05d}-of-{world:05d}.safetensors") for r in range(world)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _train(assets: dict, root: Path, name: str, backend: str, nproc: int) -> SharedRun:
    """4 steps with ``PENALTIES[backend]`` on ``nproc`` ranks of ``backend``."""
    sharding = {"backend": backend, **({"qlora": {"dropout": 0.0}} if backend == "qlora" else {})}
    config = base_config(
        assets,
        root / "runs",
        run={"name": name, "root": str(root / "runs")},
        training={"max_steps": 4, "warmup_steps": 1, "checkpoint": {"every_steps": 4, "keep_last": 1}},
        eval={"every_steps": 4, "micro_batch_size": 8, "at_start": False},
        sharding=sharding,
        regularization=PENALTIES[backend],
    )
    family = write_jsonl(root / "family.jsonl", family_records())  # gendered text: twins for consistency
    config["data"]["train"] = [
        {**config["data"]["train"][0], "weight": 0.5},
        {"name": "family", "path": str(family), "format": "instruction", "weight": 0.5},
    ]
    # tokenize inline: a forked tokenizer pool under a live gloo group was seen to deadlock on this machine
    config["data"]["prepare_workers"] = 1
    cfg = write_config(root / f"{name}.yaml", config)
    done = keeltune("train", str(cfg), "--nproc", str(nproc))
    assert done.returncode == 0, done.stderr[-3000:]
    return SharedRun(root / "runs" / name, cfg)


@pytest.fixture(scope="module")
def ddp_one_rank(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRun]:
    """1 plain process with the ddp penalties: the 1-rank reference of both [ddp] and [zero3] (PENALTIES["zero3"]
    is PENALTIES["ddp"]: the same config), trained once. Read-only."""
    yield from kept_unchanged(_train(assets, tmp_path_factory.mktemp("reg_ddp"), "reg1", "ddp", 1))


def _train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.parametrize("backend", ["ddp", "qlora", "zero3", "fsdp2"])
def test_penalties_on_two_ranks_match_one_rank(
    assets: dict, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """zero3, fsdp2: 2 partitioned ranks against 1 plain process (ddp); the others: 2 ranks against 1 of the
    same backend."""
    assert PENALTIES["zero3"] is PENALTIES["fsdp2"] is PENALTIES["ddp"]  # so the ddp reference is theirs too
    reference = (
        request.getfixturevalue("ddp_one_rank").run_dir
        if backend in ("ddp", "zero3", "fsdp2")
        else _train(assets, tmp_path, "reg1", backend, 1).run_dir
    )
    two_rank_dir = _train(assets, tmp_path, "reg2", backend, 2).run_dir
    one, two = _train_records(reference), _train_records(two_rank_dir)
    keys = ["train/loss", *(f"train/{name}" for name in PENALTIES[backend])]
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for name in PENALTIES[backend]:  # measured before each step's update
        assert one[4][f"train/{name}"] > 1e-6, name
        if name in ANCHORED:
            assert one[1][f"train/{name}"] < 1e-6, name
    worst = max(abs(one[s][k] - two[s][k]) for s in one for k in keys)
    print(f"{backend}: largest 1-rank vs 2-rank difference over {keys}: {worst:.2e}")
    for step in one:
        for key in keys:
            assert abs(one[step][key] - two[step][key]) < 1e-5, (step, key, one[step][key], two[step][key])
    if backend != "qlora":
        one_rank = load_file(reference / FISHER_FILE)
        two_ranks = {
            "zero3": lambda: zero3_fisher(two_rank_dir, {n: t.shape for n, t in one_rank.items()}, 2),
            "fsdp2": lambda: fsdp2_fisher(two_rank_dir, 2),
            "ddp": lambda: load_file(two_rank_dir / FISHER_FILE),
        }[backend]()
        assert one_rank.keys() == two_ranks.keys()
        assert sum(float(t.sum()) for t in one_rank.values()) > 0
        for name, tensor in one_rank.items():
            torch.testing.assert_close(two_ranks[name], tensor, rtol=1e-5, atol=1e-9, msg=name)
