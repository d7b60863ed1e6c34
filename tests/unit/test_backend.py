"""The data-parallel backend in one process: gradient checkpointing and bf16 autocast change no results."""

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
        raw[section].update(values)
    backend = build_backend(config_from_dict(raw), ParallelEnv())
    backend.train(True)
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 33))
    mask = torch.ones(2, 32)
    loss = backend.forward_backward(
        ids[:, :-1], lambda logits: token_nll(logits, ids[:, 1:], mask) / 64, sync_grads=True
    )
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return float(loss), grads


def test_gradient_checkpointing_gives_the_same_gradients(assets: dict, tmp_path: Path) -> None:
    loss, grads = _loss_and_grads(assets, tmp_path)
    loss_ckpt, grads_ckpt = _loss_and_grads(assets, tmp_path, model={"gradient_checkpointing": True})
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 5
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], rtol=1e-6, atol=1e-8), name


def test_bf16_autocast_on_cpu_trains_close_to_fp32(assets: dict, tmp_path: Path) -> None:
    loss, grads = _loss_and_grads(assets, tmp_path, training={"precision": "fp32"})
    loss_bf16, grads_bf16 = _loss_and_grads(assets, tmp_path, training={"precision": "bf16"})
    assert loss_bf16 != loss  # really computed in bf16
    assert loss_bf16 == pytest.approx(loss, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads.values()]),
        torch.cat([g.flatten() for g in grads_bf16.values()]),
        dim=0,
    )
    assert cosine > 0.95


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
    raw = base_config(assets, tmp_path, sharding={"backend": "qlora", "zero3": {"offload_optimizer": "cpu"}})
    with pytest.raises(ConfigError, match=r"sharding.zero3: QLoRA with ZeRO-3 .* not supported"):
        config_from_dict(raw)


def test_merge_is_refused_for_a_backend_without_adapters(assets: dict, tmp_path: Path) -> None:
    from keeltune.sharding.backends import export_checkpoint

    config = config_from_dict(base_config(assets, tmp_path))
    with pytest.raises(ValueError, match="--merge applies to backends that train adapters"):
        export_checkpoint(config, tmp_path, tmp_path / "out", merge=True)
