"""On a CUDA GPU (bf16 autocast): KL to the frozen base, L2-SP and NEFTune behave as on CPU, and a run with all
three learns and logs its penalties."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from keeltune.config import config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.ddp import DDPBackend
from keeltune.training.regularizers import RegularizerContext, build_regularizers
from keeltune.training.regularizers.kl import token_kl
from tests.conftest import base_config, keeltune, read_metrics, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REGULARIZATION = {"kl": {"weight": 1.0}, "l2sp": {"weight": 0.1}, "neftune_alpha": 5.0}


def test_penalties_and_neftune_on_cuda_in_bf16(assets: dict, tmp_path: Path) -> None:
    device = torch.device("cuda", 0)
    config = config_from_dict(base_config(assets, tmp_path, regularization=REGULARIZATION))
    backend = DDPBackend(config, ParallelEnv(device=device), keep_reference=True)
    context = RegularizerContext(config, backend, ParallelEnv(device=device), tmp_path, {})
    (l2sp,) = [r for r in build_regularizers(context) if r.name == "l2sp"]
    assert backend.amp_dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (4, 65), generator=generator).to(device)
    mask = torch.ones(4, 64, device=device)
    backend.train(False)
    assert float(token_kl(backend.logits(ids[:, :-1]), backend.reference_logits(ids[:, :-1]), mask)) < 1e-6
    embedding = backend.model.get_input_embeddings()
    clean = torch.nn.functional.embedding(ids, embedding.weight).detach()
    assert torch.equal(embedding(ids).detach(), clean)  # no noise at eval
    backend.train(True)
    noise = (embedding(ids) - clean).detach()
    scale = 5.0 / math.sqrt(ids.shape[1] * embedding.weight.shape[1])
    assert 0.5 * scale < float(noise.abs().max()) <= scale * (1 + 1e-5)
    values = []
    for _ in range(4):
        reference = backend.reference_logits(ids[:, :-1])

        def loss_fn(logits: torch.Tensor, reference: torch.Tensor = reference) -> torch.Tensor:
            return (token_nll(logits, ids[:, 1:], mask) + token_kl(logits, reference, mask)) / mask.sum()

        backend.forward_backward(ids[:, :-1], loss_fn, sync_grads=True)
        values.append(l2sp.add_gradients())
        backend.step(3e-3)
    assert values[0] == 0.0 and values[-1] > 0
    assert all(p.grad is None for p in backend.model.parameters())  # the step zeroed them, penalties included


def test_cuda_run_with_kl_l2sp_and_neftune_learns(assets: dict, tmp_path: Path) -> None:
    config = base_config(
        assets, tmp_path / "runs", training={"max_steps": 8, "warmup_steps": 1}, regularization=REGULARIZATION
    )
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {r["step"]: r for r in read_metrics(tmp_path / "runs" / "test") if "train/loss" in r}
    assert steps[8]["train/loss"] < steps[1]["train/loss"]
    assert steps[1]["train/l2sp"] == 0.0 and steps[8]["train/l2sp"] > 0 and steps[8]["train/kl"] > 0


def test_zero3_on_cuda_with_kl_l2sp_and_ewc_matches_ddp(assets: dict, tmp_path: Path) -> None:
    """ZeRO-3 on one GPU in bf16 (partitioned reference, anchors and Fisher, penalty gradients added to the
    gradient partition) against plain data parallel on the same GPU: the same penalties, within bf16 noise."""
    regularization = {"kl": {"weight": 1.0}, "l2sp": {"weight": 0.1}, "ewc": {"weight": 100.0, "samples": 8}}
    steps = {}
    for backend in ("ddp", "zero3"):
        config = base_config(
            assets,
            tmp_path / "runs",
            run={"name": backend, "root": str(tmp_path / "runs")},
            training={"max_steps": 6, "warmup_steps": 1, "precision": "bf16"},
            sharding={"backend": backend},
            regularization=regularization,
        )
        done = keeltune("train", str(write_config(tmp_path / f"{backend}.yaml", config)))
        assert done.returncode == 0, done.stderr[-3000:]
        steps[backend] = {
            r["step"]: r for r in read_metrics(tmp_path / "runs" / backend) if "train/loss" in r
        }
    ddp, zero3 = steps["ddp"], steps["zero3"]
    print({k: (ddp[6][k], zero3[6][k]) for k in ("train/loss", "train/kl", "train/l2sp", "train/ewc")})
    assert zero3[6]["train/loss"] < zero3[1]["train/loss"]
    for key in ("train/kl", "train/l2sp", "train/ewc"):
        assert zero3[6][key] > 0 and abs(zero3[6][key] / ddp[6][key] - 1) < 0.1, key
