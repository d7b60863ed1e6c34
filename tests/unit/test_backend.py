"""The ddp and fsdp2 backends in one process: gradient checkpointing and bf16 compute change no results (fsdp2:
a one-rank mesh, its gradients DTensors); the registry's entries and their settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from keeltune.config import config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.backends import build_backend
from tests.conftest import base_config


def _loss_and_grads(assets: dict, tmp_path: Path, **overrides) -> tuple[float, dict[str, torch.Tensor]]:
    raw = base_config(assets, tmp_path)
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    parallel = ParallelEnv()
    try:  # fsdp2 asks for a one-rank process group: destroyed after, as a run's rank does
        backend = build_backend(config_from_dict(raw), parallel)
        backend.train(True)
        torch.manual_seed(0)
        ids = torch.randint(3, 500, (2, 33))
        mask = torch.ones(2, 32)
        loss = backend.forward_backward(
            ids[:, :-1], lambda logits: token_nll(logits, ids[:, 1:], mask) / 64, sync_grads=True
        )
        grads = {n: _whole(p.grad) for n, p in backend.model.named_parameters() if p.grad is not None}
    finally:
        parallel.close()
    return float(loss), grads


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_gradient_checkpointing_gives_the_same_gradients(assets: dict, tmp_path: Path, backend: str) -> None:
    sharding = {"backend": backend}
    loss, grads = _loss_and_grads(assets, tmp_path, sharding=sharding)
    loss_ckpt, grads_ckpt = _loss_and_grads(
        assets, tmp_path, sharding=sharding, model={"gradient_checkpointing": True}
    )
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 5
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-6, atol=1e-8), name


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_bf16_compute_on_cpu_trains_close_to_fp32(assets: dict, tmp_path: Path, backend: str) -> None:
    """ddp: autocast; fsdp2: the mixed-precision policy (bf16 parameters for compute over fp32 masters)."""
    sharding = {"backend": backend}
    loss, grads = _loss_and_grads(assets, tmp_path, sharding=sharding, training={"precision": "fp32"})
    loss_bf16, grads_bf16 = _loss_and_grads(
        assets, tmp_path, sharding=sharding, training={"precision": "bf16"}
    )
    assert loss_bf16 != loss  # really computed in bf16
    assert loss_bf16 == pytest.approx(loss, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads.values()]),
        torch.cat([g.flatten() for g in grads_bf16.values()]),
        dim=0,
    )
    assert cosine > 0.95
    assert all(g.dtype == torch.float32 for g in grads_bf16.values())  # reduced and kept in fp32


def test_fsdp2_with_compiled_blocks_computes_what_eager_blocks_do(assets: dict, tmp_path: Path) -> None:
    """sharding.fsdp2.compile: each block through torch.compile (the only compile on CPU in the suite: it costs
    tens of seconds here)."""
    sharding = {"backend": "fsdp2"}
    loss, grads = _loss_and_grads(assets, tmp_path, sharding=sharding)
    loss_compiled, grads_compiled = _loss_and_grads(
        assets, tmp_path, sharding={**sharding, "fsdp2": {"compile": True}}
    )
    assert loss_compiled == pytest.approx(loss, abs=1e-5)
    for name in grads:
        assert torch.allclose(grads[name], grads_compiled[name], rtol=1e-4, atol=1e-6), name


def test_every_registry_entry_names_a_module_that_builds_and_exports() -> None:
    import importlib
    import inspect

    from keeltune.config import BACKENDS

    for name, spec in BACKENDS.items():
        module = importlib.import_module(spec.module)
        for function in ("build", "export_checkpoint"):
            assert callable(getattr(module, function, None)), (name, function)
        assert "keep_reference" in inspect.signature(module.build).parameters, name
        assert "merge" in inspect.signature(module.export_checkpoint).parameters, name


def test_unknown_backends_and_another_backends_settings_are_refused(assets: dict, tmp_path: Path) -> None:
    from keeltune.config import ConfigError

    raw = base_config(assets, tmp_path, sharding={"backend": "qlor"})
    with pytest.raises(
        ConfigError, match=r"sharding.backend: 'qlor' is not one of \[.*\] \(did you mean 'qlora'\?\)"
    ):
        config_from_dict(raw)
    raw = base_config(assets, tmp_path, sharding={"backend": "ddp", "qlora": {"rank": 4}})
    with pytest.raises(
        ConfigError, match=r"sharding.qlora: settings for backend qlora, but backend is 'ddp'"
    ):
        config_from_dict(raw)
    raw = base_config(assets, tmp_path, sharding={"backend": "zero3", "fsdp2": {"compile": True}})
    with pytest.raises(
        ConfigError, match=r"sharding.fsdp2: settings for backend fsdp2, but backend is 'zero3'"
    ):
        config_from_dict(raw)
    raw = base_config(assets, tmp_path, sharding={"backend": "qlora", "zero3": {"offload_optimizer": "cpu"}})
    with pytest.raises(ConfigError, match=r"sharding.zero3: QLoRA with ZeRO-3 .* not supported"):
        config_from_dict(raw)


def test_merge_is_refused_for_a_backend_without_adapters(assets: dict, tmp_path: Path) -> None:
    from keeltune.sharding.backends import export_checkpoint

    config = config_from_dict(base_config(assets, tmp_path))
    with pytest.raises(ValueError, match="--merge applies to backends that train adapters"):
        export_checkpoint(config, tmp_path, tmp_path / "out", merge=True)
