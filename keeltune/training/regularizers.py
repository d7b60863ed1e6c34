"""Loss-side regularizers: the KL penalty to the base model, and EWC's Fisher (estimated once, kept in the run
folder so a resume reuses it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from keeltune.data_pipeline.reader import PackedDataset
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.base import Backend

log = logging.getLogger("keeltune")

FISHER_FILE = "ewc_fisher.safetensors"


def token_kl(
    logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Summed KL(reference || model) over the tokens whose mask is 1, both softened by ``temperature``; times
    temperature^2 so its gradients keep their scale (Hinton et al.)."""
    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_p = F.log_softmax(reference.to(logits.dtype) / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum() * temperature**2


def _fisher_samples(sets: list[PackedDataset], samples: int) -> list[tuple[PackedDataset, int]]:
    """Up to ``samples`` sequences, taken in turn from each set."""
    chosen: list[tuple[PackedDataset, int]] = []
    for index in range(max((len(s) for s in sets), default=0)):
        for dataset in sets:
            if index < len(dataset) and len(chosen) < samples:
                chosen.append((dataset, index))
    return chosen


def estimate_fisher(
    backend: Backend, sets: list[PackedDataset], *, samples: int, batch_size: int, parallel: ParallelEnv
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher at the current weights: the mean over batches of the squared gradient of each batch's
    mean LM loss; batches are fixed by the data, so it is the same for any number of ranks. Replicas spread the
    batches over ranks and sum; a partitioned backend runs every batch on every rank (the reduced gradient is
    then that batch's) and each rank keeps its slice."""
    chosen = _fisher_samples(sets, samples)
    if not chosen:
        raise ValueError("regularization.ewc: the retention sets hold no samples to estimate the Fisher on")
    batches = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    if backend.partitioned:
        plan = [(number, True) for number in range(len(batches))]
    else:  # a rank without a batch computes one it ignores, to get the shapes and keep the collectives paired
        rounds = -(-len(batches) // parallel.world_size)
        plan = [
            (number, number < len(batches))
            for number in range(parallel.rank, rounds * parallel.world_size, parallel.world_size)
        ]
    fisher: dict[str, torch.Tensor] = {}
    backend.train(False)
    for number, counted in plan:
        rows = [dataset.get(np.array([i])) for dataset, i in batches[number if counted else 0]]
        ids = torch.from_numpy(np.concatenate([r[0] for r in rows])).to(parallel.device)
        mask = torch.from_numpy(np.concatenate([r[1] for r in rows])[:, 1:].astype(np.float32))
        mask = mask.to(parallel.device)

        def loss_fn(logits: torch.Tensor, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> torch.Tensor:
            return token_nll(logits, ids[:, 1:], mask) / mask.sum().clamp(min=1.0)

        for name, grad in backend.parameter_gradients(ids[:, :-1], loss_fn).items():
            square = grad.detach().float() ** 2 * float(counted)
            fisher[name] = fisher[name] + square if name in fisher else square
    backend.train(True)
    for name in sorted(fisher):
        if not backend.partitioned:
            parallel.all_reduce_sum(fisher[name])
        fisher[name] /= len(batches)
    return fisher


def fisher_file(run_dir: Path, backend: Backend, parallel: ParallelEnv) -> Path:
    """One file for replicas; one per rank (its slices) for a partitioned backend."""
    if not backend.partitioned:
        return run_dir / FISHER_FILE
    return run_dir / f"ewc_fisher-rank{parallel.rank:05d}-of-{parallel.world_size:05d}.safetensors"


def ewc_fisher(
    backend: Backend,
    run_dir: Path,
    sets: list[PackedDataset],
    *,
    samples: int,
    batch_size: int,
    parallel: ParallelEnv,
    resumed: bool,
) -> dict[str, torch.Tensor]:
    """The Fisher from the run folder when there; otherwise estimated now (at the pretrained weights, so only
    before the first step) and written there by rank 0."""
    from safetensors.torch import load_file, save_file

    path = fisher_file(run_dir, backend, parallel)
    if path.is_file():
        log.info("EWC: Fisher read from %s", path)
        return load_file(str(path), device=str(parallel.device))
    if resumed:
        raise FileNotFoundError(
            f"{path}: missing, and the Fisher can only be estimated at the pretrained weights; restore the file "
            "or start a new run"
        )
    fisher = estimate_fisher(backend, sets, samples=samples, batch_size=batch_size, parallel=parallel)
    if parallel.is_main or backend.partitioned:
        tmp = path.with_suffix(".tmp")
        save_file({n: t.detach().cpu().contiguous() for n, t in fisher.items()}, str(tmp))
        os.replace(tmp, path)
        log.info("EWC: Fisher estimated on the retention data, written to %s", path)
    parallel.barrier()
    return fisher
