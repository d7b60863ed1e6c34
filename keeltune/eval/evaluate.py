"""Exact held-out loss and perplexity, split over ranks: summed NLL and token counts are all-reduced."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from keeltune.data_pipeline.reader import PackedDataset, eval_shard


@dataclass(frozen=True)
class EvalResult:
    """Mean NLL per target token over the whole set, and its perplexity."""

    loss: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the target tokens whose mask is 1."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses * mask.reshape(-1).to(losses.dtype)).sum()


@torch.no_grad()
def evaluate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: PackedDataset,
    *,
    rank: int,
    world_size: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    micro_batch_size: int,
    device: torch.device,
    max_samples: int | None = None,
) -> EvalResult:
    """Evaluate this rank's part of ``dataset``; every rank returns the same global result.

    Every rank runs the same number of forward passes (a rank with fewer samples repeats a batch and ignores
    it): sharded backends gather parameters inside forward, so ranks must stay in step."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    sample_ids = eval_shard(dataset, rank, world_size, max_samples)
    most_samples = len(eval_shard(dataset, 0, world_size, max_samples))  # rank 0 gets the most (strided)
    for start in range(0, most_samples, micro_batch_size):
        batch = sample_ids[start : start + micro_batch_size]
        counted = len(batch) > 0
        ids, mask = dataset.get(batch if counted else np.zeros(1, dtype=np.int64))
        ids_t = torch.from_numpy(ids).to(device)
        mask_t = torch.from_numpy(mask[:, 1:].astype(np.float32)).to(device)
        logits = logits_fn(ids_t[:, :-1])
        if counted:
            totals[0] += token_nll(logits.float(), ids_t[:, 1:], mask_t).double()
            totals[1] += mask_t.sum().double()
    all_reduce_sum(totals)
    tokens = int(totals[1].item())
    return EvalResult(loss=float(totals[0].item()) / max(tokens, 1), tokens=tokens)


def forgetting(results: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``retention/<set>/forgetting_pct``: the relative rise of each retention perplexity over the baseline."""
    return {
        key.replace("/ppl", "/forgetting_pct"): 100.0 * (value / baseline[key] - 1.0)
        for key, value in results.items()
        if key.startswith("retention/") and key.endswith("/ppl") and key in baseline
    }
