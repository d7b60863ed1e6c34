"""EWC: 1/2 w sum F (theta - theta_0)^2 with the diagonal Fisher F of the retention data at the pretrained
weights (estimated once, kept in the run folder so a resume reuses it)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from keeltune.atomic import atomic_path
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import token_nll
from keeltune.eval.names import retention_set
from keeltune.sharding.base import Backend
from keeltune.training.regularizers.base import Regularizer, RegularizerContext

log = logging.getLogger("keeltune")

FISHER_FILE = "ewc_fisher.safetensors"


class EWC(Regularizer):
    name = "ewc"

    def __init__(self, context: RegularizerContext) -> None:
        self.context = context
        self.settings = context.config.regularization.ewc
        self.anchors = context.pretrained()
        self.fisher: dict[str, torch.Tensor] = {}

    def start(self, *, resumed: bool) -> None:
        """Read the Fisher from the run folder, or estimate it now (only at the pretrained weights)."""
        names = self.settings.sets or [r.name for r in self.context.config.data.retention]
        chosen = {retention_set(name) for name in names}
        sets = [d for name, d in self.context.held_out.items() if name in chosen]
        fisher = ewc_fisher(
            self.context.backend,
            self.context.run_dir,
            sets,
            samples=self.settings.samples,
            batch_size=self.context.config.training.micro_batch_size,
            parallel=self.context.parallel,
            resumed=resumed,
        )
        wrong = sorted(set(self.anchors) ^ set(fisher)) or [
            n for n in self.anchors if fisher[n].numel() != self.anchors[n].numel()
        ]
        if wrong:
            raise ValueError(f"EWC Fisher does not fit this rank's trainable parameters (e.g. {wrong[:3]})")
        self.fisher = {
            n: fisher[n].reshape(a.shape).to(a.device, torch.float32) for n, a in self.anchors.items()
        }

    def add_gradients(self) -> float:
        if not self.fisher:
            raise RuntimeError(
                "EWC is on but no Fisher was set (start() estimates or reads it before training)"
            )
        local = torch.zeros((), dtype=torch.float64, device=self.context.parallel.device)
        for param in self.context.backend.local_parameters():
            change = param.value - self.anchors[param.name]
            fisher = self.fisher[param.name]
            local += 0.5 * (fisher.double() * change.double() ** 2).sum()
            param.add_to_grad(self.settings.weight * fisher * change)
        return self.settings.weight * float(self.context.total(local))


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

        for name, grad in backend.local_gradients(ids[:, :-1], loss_fn).items():
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
        with atomic_path(path) as tmp:
            save_file({n: t.detach().cpu().contiguous() for n, t in fisher.items()}, str(tmp))
        log.info("EWC: Fisher estimated on the retention data, written to %s", path)
    parallel.barrier()
    return fisher
