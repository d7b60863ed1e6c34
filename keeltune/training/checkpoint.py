"""Atomic checkpoints: every rank writes into a temporary folder, rank 0 renames it once all are done.

A checkpoint folder ``step_NNNNNNN`` exists only when complete (rename is atomic on POSIX filesystems);
temporary folders left by a crash are ignored and cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keeltune.sharding.base import Backend
from keeltune.sharding.parallel import ParallelEnv
from keeltune.training.run_files import STATE_FILE, checkpoint_root, complete_checkpoints


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(python_state), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    backend: Backend,
    trainer_state: dict[str, Any],
    parallel: ParallelEnv,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep_last``."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if parallel.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    parallel.barrier()
    backend.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{parallel.rank}.pt")
    parallel.barrier()
    if parallel.is_main:
        (tmp / STATE_FILE).write_text(
            json.dumps({**trainer_state, "world_size": parallel.world_size}, indent=1)
        )
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    parallel.barrier()
    return final


def load_checkpoint(folder: Path, backend: Backend, parallel: ParallelEnv) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; return the trainer state."""
    state = json.loads((folder / STATE_FILE).read_text())
    backend.load(folder)
    rng_file = folder / f"rng_rank{parallel.rank}.pt"
    if rng_file.is_file():  # a rank that did not exist before starts from its seeded RNG
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
