"""What every regularizer is, and what it is given: the backend's uniform view, never the model itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keeltune.config import Config
from keeltune.data_pipeline.reader import PackedDataset
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import Backend

# (logits, target mask) -> the weighted term summed over the target tokens of a micro-batch
LossTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RegularizerContext:
    """What a regularizer may use: the config, the backend, the ranks, the run folder, the held-out sets and the
    tokenizer (a term that rewrites the training text, such as counterfactual consistency)."""

    config: Config
    backend: Backend
    parallel: ParallelEnv
    run_dir: Path
    held_out: dict[str, PackedDataset]
    tokenizer: Any = None
    base_vocab_size: int | None = (
        None  # with a domain vocabulary: the rows that compare with the original base
    )
    _pretrained: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def pretrained(self) -> dict[str, torch.Tensor]:
        """Each local parameter's pretrained fp32 values, taken at the first call (build time: before any step
        or resume) and shared by the weight-space penalties; the backend's frozen copy when it keeps one."""
        if self._pretrained is None:
            self._pretrained = {
                p.name: p.pretrained if p.pretrained is not None else p.value.clone()
                for p in self.backend.local_parameters()
            }
        return self._pretrained

    def total(self, local: torch.Tensor) -> torch.Tensor:
        """A sum over this rank's parameters made a sum over the model: all-reduced when partitioned."""
        return self.parallel.all_reduce_sum(local) if self.backend.partitioned else local


class Regularizer:
    """A term of the training objective. Loss-side terms (``loss_term``) join each micro-batch's loss;
    weight-space terms (``add_gradients``) add their gradient once per optimizer step, after the reduction over
    ranks, so every rank adds the same exact penalty whatever the number of ranks or micro-batches."""

    name: str

    def start(self, *, resumed: bool) -> None:
        """Called once after the resume (or its absence), before the first step."""

    def loss_term(self, input_ids: torch.Tensor) -> LossTerm | None:
        """Called before a micro-batch's forward: the term to add to its loss, or None."""
        return None

    def add_gradients(self) -> float | None:
        """Add this penalty's gradient to the reduced gradients; return its weighted value, or None."""
        return None
