"""Atomic, verifiable checkpoints: every rank writes into a temporary folder, the manifest (each file's size and
sha256) is written last, and rank 0 renames the folder once all are done.

A checkpoint folder ``step_NNNNNNN`` exists only when complete (rename is atomic on POSIX filesystems);
temporary folders left by a crash are ignored and cleaned on the next save. A resume checks the checkpoint
against its manifest first, and falls back to the newest intact one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from keeltune.distributed import ParallelEnv
from keeltune.run_folder import (
    MANIFEST_FILE,
    STATE_FILE,
    checkpoint_root,
    complete_checkpoints,
    follow_umask,
)
from keeltune.sharding.base import Backend
from keeltune.training.manifest import (
    CheckpointError,
    check_files,
    checkpoint_files,
    damaged_checkpoints,
    deal,
    describe,
    move_aside,
    no_intact_checkpoint,
    read_manifest,
    verify,
    write_manifest,
)

log = logging.getLogger("keeltune")
LOW_SPACE = 64 * 2**20  # a checkpoint that failed with less free than this failed for want of space


def _fsync_tree(folder: Path, *, files: bool = True) -> None:
    for path in folder.rglob("*") if files else ():
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
    *,
    checksums: bool = True,
) -> Path:
    """Write checkpoint ``step`` atomically, its manifest last, and keep the newest ``keep_last``.

    Every rank writes its part into a temporary folder; the ranks then share the files out and each records
    the sizes (and sha256 with ``checksums``) of its share; rank 0 writes the manifest and renames the folder.
    A full disk or any write error leaves the earlier checkpoints as they were."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    try:
        if parallel.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        parallel.barrier()
        backend.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{parallel.rank}.pt")
        if parallel.is_main:
            state = {**trainer_state, "world_size": parallel.world_size}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # fsynced with the folder below
        parallel.barrier()
        sizes: dict[str, int] = parallel.broadcast_object(checkpoint_files(tmp) if parallel.is_main else None)
        mine = deal(sizes, parallel.world_size)[parallel.rank]
        described = parallel.gather_object(describe(tmp, mine, checksums=checksums))
        if parallel.is_main:
            write_manifest(tmp, step, {name: entry for part in described for name, entry in part.items()})
            follow_umask(tmp)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_tree(root, files=False)
    except Exception as err:  # a full disk surfaces as OSError, SafetensorError or torch's RuntimeError
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        if parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < LOW_SPACE
        raise CheckpointError(
            f"{final}: could not be written ({type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}); "
            f"{free / 2**20:.0f} MiB free on that filesystem. The earlier checkpoints in {root} are untouched. "
            + (
                "The disk is full: free space or point run.root at a larger filesystem, then resume"
                if full
                else "Fix that, then resume"
            )  # fmt: skip
        ) from err
    # read back as written before rotating: an intact checkpoint is never deleted for a bad one
    problems = parallel.broadcast_object(verify_sizes(final) if parallel.is_main else None)
    if problems:
        raise CheckpointError(
            f"{final}: damaged right after writing ({'; '.join(problems)}); the earlier checkpoints are kept. "
            f"Check the filesystem of {root}"
        )
    if parallel.is_main:
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    parallel.barrier()
    return final


def verify_sizes(folder: Path) -> list[str]:
    """The manifest's sizes against the files (no hashing)."""
    return verify(folder, checksums=False) or []


def verify_on_ranks(folder: Path, parallel: ParallelEnv, *, checksums: bool) -> list[str] | None:
    """Every rank checks its share of a checkpoint's files in parallel; every rank gets all the problems (empty:
    intact), or None when the checkpoint has no manifest."""
    expected = None
    if parallel.is_main:
        try:
            expected = read_manifest(folder)
        except CheckpointError as err:
            expected = {"": str(err)}
    expected = parallel.broadcast_object(expected)
    if expected is None:
        return None
    if "" in expected:
        return [expected[""]]
    sizes = {name: entry["size"] for name, entry in expected.items()}
    mine = deal(sizes, parallel.world_size)[parallel.rank]
    found = parallel.gather_object(check_files(folder, expected, mine, checksums=checksums))
    problems = sorted(p for part in found for p in part) if parallel.is_main else None
    return parallel.broadcast_object(problems)


def resume_checkpoint(run_dir: Path, parallel: ParallelEnv, *, checksums: bool) -> Path | None:
    """The newest intact checkpoint of a run (None for a new run). Damaged ones are moved aside on the way, with
    what is wrong logged; a checkpoint without a manifest is taken with a warning. Raises CheckpointError when
    the run has checkpoints but none is intact."""
    candidates = parallel.broadcast_object(
        [str(p) for p in complete_checkpoints(run_dir)] if parallel.is_main else None
    )
    moved = []
    for folder in map(Path, reversed(candidates)):
        problems = verify_on_ranks(folder, parallel, checksums=checksums)
        if problems is None:
            log.warning("%s has no %s (written by an older keeltune): resuming without verifying it", folder,
                        MANIFEST_FILE)  # fmt: skip
            return folder
        if not problems:
            if moved:
                log.warning("resuming from the newest intact checkpoint, %s, instead", folder.name)
            return folder
        if parallel.is_main:
            aside = move_aside(folder, problems)
            log.error(
                "checkpoint %s is damaged: %s; moved aside to %s",
                folder.name,
                "; ".join(problems),
                aside.name,
            )
        moved.append(folder.name)
        parallel.barrier()
    damaged = [note["checkpoint"] for note in damaged_checkpoints(run_dir)]
    if damaged:
        raise no_intact_checkpoint(run_dir, damaged)
    return None


def load_checkpoint(folder: Path, backend: Backend, parallel: ParallelEnv) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; return the trainer state."""
    state = json.loads((folder / STATE_FILE).read_text())
    backend.load(folder)
    rng_file = folder / f"rng_rank{parallel.rank}.pt"
    if rng_file.is_file():  # a rank that did not exist before starts from its seeded RNG
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state
