"""On a CUDA GPU: self-replay samples drawn through each backend (ddp in bf16, ZeRO-3, QLoRA's 4-bit base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import base_config, keeltune, read_metrics, with_base_samples, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("backend", ["ddp", "zero3", "qlora"])
def test_base_samples_are_drawn_on_cuda_and_mixed_in(assets: dict, tmp_path: Path, backend: str) -> None:
    config = base_config(
        assets,
        tmp_path / "runs",
        training={"max_steps": 4, "warmup_steps": 1, "precision": "bf16"},
        sharding={"backend": backend},
    )
    with_base_samples(config, "base", samples=16, max_new_tokens=24, batch_size=8)
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "test"
    texts = [
        json.loads(line)["text"] for line in (run / "base_samples" / "base.jsonl").read_text().splitlines()
    ]
    assert len(texts) >= 14 and len(set(texts)) >= 8, texts
    fractions = [r["data/base/fraction"] for r in read_metrics(run) if "data/base/fraction" in r]
    assert fractions and abs(fractions[-1] - 0.25) < 0.1
