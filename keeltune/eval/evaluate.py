"""Exact held-out loss, perplexity and bits per byte, split over ranks in whole micro-batches: the same numbers on
any number of ranks. One function serves the trainer and ``keeltune eval``: it is handed a way to get logits,
never a backend.

Bits per byte is the set's summed NLL of its target tokens, in bits, over the UTF-8 bytes of text those tokens
stand for. Unlike loss per token it does not depend on how the text is cut into tokens, so it compares models
with different vocabularies (a base and its fine-tune with a domain vocabulary)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from keeltune.data_pipeline.reader import PackedDataset
from keeltune.distributed import ParallelEnv
from keeltune.eval.names import (
    BPB,
    FORGETTING,
    FORGETTING_BPB,
    LOSS,
    PPL,
    metric,
    retention_metrics,
    retention_set,
)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    """Mean NLL per target token over the whole set, its perplexity, and its bits per byte: the summed NLL in
    bits over the UTF-8 bytes of the target tokens' text."""

    loss: float
    tokens: int
    bpb: float
    target_bytes: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the target tokens whose mask is 1."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1).to(losses.dtype)).sum()


@torch.no_grad()
def evaluate(
    logits_fn: LogitsFn,
    dataset: PackedDataset,
    parallel: ParallelEnv,
    *,
    micro_batch_size: int,
    max_samples: int | None = None,
) -> EvalResult:
    """Evaluate this rank's part of ``dataset``; every rank returns the same global result, and the same
    whatever the number of ranks: the set is cut into micro-batches in sample order and the batches are dealt
    to the ranks whole (batch ``b`` to rank ``b mod world``), each batch's sum lands in its own slot of a
    vector that is all-reduced (every slot has one contributor, so exactly), and the slots are added up in
    batch order.

    Every rank runs the same number of forward passes (a rank with fewer batches repeats one and ignores it):
    sharded backends gather parameters inside forward, so ranks must stay in step."""
    rank, world_size, device = parallel.rank, parallel.world_size, parallel.device
    total = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    batches = -(-total // micro_batch_size)
    sums = torch.zeros(3, max(batches, 1), dtype=torch.float64, device=device)  # NLL, target tokens, bytes
    for index in range(rank, rank + world_size * -(-batches // world_size), world_size):
        counted = index < batches
        first = index * micro_batch_size if counted else 0
        batch = np.arange(first, min(first + micro_batch_size, total) if counted else 1, dtype=np.int64)
        ids, mask = dataset.get(batch)
        ids_t = torch.from_numpy(ids).to(device)
        mask_t = torch.from_numpy(mask[:, 1:].astype(np.float32)).to(device)
        logits = logits_fn(ids_t[:, :-1])
        if counted:
            sums[0, index] = token_nll(logits.float(), ids_t[:, 1:], mask_t).double()
            sums[1, index] = mask_t.sum().double()
            sums[2, index] = float(dataset.target_bytes(batch).sum())
    parallel.all_reduce_sum(sums)
    nll, tokens, target_bytes = (float(value) for value in sums.sum(dim=1).tolist())
    return EvalResult(
        loss=nll / max(tokens, 1.0),
        tokens=int(tokens),
        bpb=nll / math.log(2) / max(target_bytes, 1.0),
        target_bytes=int(target_bytes),
    )


def evaluate_sets(
    logits_fn: LogitsFn,
    sets: dict[str, PackedDataset],
    parallel: ParallelEnv,
    *,
    micro_batch_size: int,
    max_samples: int | None = None,
) -> dict[str, float]:
    """``<set>/loss``, ``<set>/ppl`` and ``<set>/bpb`` of every held-out set (``val``, ``retention/<name>``)."""
    results: dict[str, float] = {}
    for name, dataset in sets.items():
        result = evaluate(
            logits_fn, dataset, parallel, micro_batch_size=micro_batch_size, max_samples=max_samples
        )
        results[metric(name, LOSS)] = result.loss
        results[metric(name, PPL)] = result.ppl
        results[metric(name, BPB)] = result.bpb
    return results


def forgetting(results: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``retention/<set>/forgetting_pct``: the relative rise of each retention perplexity over the baseline;
    ``retention/<set>/forgetting_bpb_pct``: that of its bits per byte, which stays meaningful when the
    vocabulary changes (a perplexity per token then compares different tokens)."""
    out = {}
    for stat, name_of in ((PPL, FORGETTING), (BPB, FORGETTING_BPB)):
        before = retention_metrics(baseline, stat)
        for name, value in retention_metrics(results, stat).items():
            if name in before:
                out[metric(retention_set(name), name_of)] = 100.0 * (value / before[name] - 1.0)
    return out
