"""Shared runs of the distributed tests: one 1-rank QLoRA run per session (test_qlora_parallel.py compares its
2-rank run, a resumed run and a damaged copy with it; test_eval_backends.py evaluates its checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SharedRun, base_config, keeltune, kept_unchanged, write_config

QLORA_STEPS = 4


def qlora_run_config(assets: dict[str, Path], root: Path, name: str) -> dict[str, Any]:
    """QLoRA (rank 4, no dropout) for 4 steps: checkpoints at 2 and 4 (both kept), evaluated at steps 0 and 4 (the
    eval at step 0 goes through the 4-bit layers in eval mode before training, the bitsandbytes CPU trap)."""
    return base_config(
        assets,
        root / "runs",
        run={"name": name, "root": str(root / "runs")},
        training={
            "max_steps": QLORA_STEPS,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": QLORA_STEPS // 2, "keep_last": 2},
        },
        eval={"every_steps": QLORA_STEPS, "micro_batch_size": 4},
        data={"prepare_workers": 1},  # tokenize inline: the forked pool hung twice here on a loaded machine
        sharding={"backend": "qlora", "qlora": {"rank": 4, "dropout": 0.0}},
    )


@pytest.fixture(scope="session")
def qlora_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRun]:
    """``qlora_run_config`` trained on 1 rank through the CLI (run name ``ranks1``), shared by the session."""
    root = tmp_path_factory.mktemp("qlora_run")
    cfg = write_config(root / "cfg1.yaml", qlora_run_config(assets, root, "ranks1"))
    done = keeltune("train", str(cfg), "--nproc", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    yield from kept_unchanged(SharedRun(root / "runs" / "ranks1", cfg))
