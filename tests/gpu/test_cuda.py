"""On a CUDA GPU: a short run trains in bf16 (``precision: auto``: ddp's autocast, fsdp2's mixed-precision
policy, also with offload to the host) and exports a loadable model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import base_config, keeltune, train_losses, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    "sharding", [{"backend": "ddp"}, {"backend": "fsdp2"}, {"backend": "fsdp2", "fsdp2": {"offload": "cpu"}}]
)
def test_cuda_run_uses_bf16_and_learns(assets: dict, tmp_path: Path, sharding: dict) -> None:
    from keeltune.sharding.model import autocast_dtype

    assert autocast_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    config = base_config(
        assets, tmp_path / "runs", training={"max_steps": 8, "warmup_steps": 1}, sharding=sharding
    )
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 0, done.stderr
    losses = train_losses(tmp_path / "runs" / "test")
    assert losses[8] < losses[1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "test" / "final", local_files_only=True)
