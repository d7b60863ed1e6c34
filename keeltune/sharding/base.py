"""The small interface between the training loop and a way of spreading the model over ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class LocalParameter:
    """One trainable parameter as this rank holds it: its name, its current fp32 values (the whole tensor on
    a replica, this rank's flat slice when partitioned), its pretrained values when the backend keeps them
    anyway (a frozen copy for ``reference_logits``), and how to add to its reduced gradient."""

    name: str
    value: torch.Tensor
    add_to_grad: Callable[[torch.Tensor], None]
    pretrained: torch.Tensor | None = None


class Backend(Protocol):
    """What the loop needs from a backend; it never asks which backend it has."""

    partitioned: (
        bool  # True when each rank holds a slice of every parameter (ZeRO-3), False for whole replicas
    )

    def forward_backward(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *, sync_grads: bool
    ) -> torch.Tensor:
        """Forward, loss_fn(logits), backward; gradients are reduced over ranks when ``sync_grads``."""
        ...

    def step(self, lr: float) -> float:
        """Clip, apply the optimizer at ``lr``, zero gradients; return the gradient norm before clipping."""
        ...

    def reset_optimizer(self) -> None:
        """Optimizer state as a new optimizer has it (a new stage of a staged run); the weights stay."""
        ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Forward without gradients (evaluation)."""
        ...

    def train(self, mode: bool = True) -> None: ...

    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """transformers' ``generate`` on the model as it is now (before the first step: the base model), with
        ``options`` passed on (``attention_mask``, ``max_new_tokens``, ...); when ``partitioned`` every rank
        makes the same number of calls."""
        ...

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The pretrained model's logits, without gradients; only when built with ``keep_reference``."""
        ...

    def local_parameters(self) -> list[LocalParameter]:
        """This rank's trainable parameters as regularizers see them (whole on replicas, slices when
        ``partitioned``); call after the last micro-batch of a step, when gradients are reduced."""
        ...

    def local_gradients(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The gradients of loss_fn(logits), named and shaped like ``local_parameters``, not stored: this
        rank's own, not reduced (replicas); or, when ``partitioned``, this rank's slice of the gradient reduced
        over ranks, which needs every rank to pass the same batch."""
        ...

    def save(self, folder: Path) -> None:
        """Write model and optimizer state into ``folder`` (called on every rank)."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote."""
        ...

    def export(self, folder: Path) -> None:
        """Write a Hugging Face model folder (safetensors + config) that transformers loads."""
        ...
