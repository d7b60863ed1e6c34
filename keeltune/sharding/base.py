"""The small interface between the training loop and a way of spreading the model over ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch


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

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Forward without gradients (evaluation)."""
        ...

    def train(self, mode: bool = True) -> None: ...

    def sample(
        self, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float, eos_token_id: int | None,
        pad_token_id: int,
    ) -> torch.Tensor:  # fmt: skip
        """Continuations drawn from the model as it is now (before the first step: the base model); when
        ``partitioned`` every rank makes the same number of calls."""
        ...

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The pretrained model's logits, without gradients (the KL penalty's target)."""
        ...

    def add_penalties(self) -> dict[str, float]:
        """Add the weight-space penalties' gradients (L2-SP, EWC) to the reduced gradients, once per optimizer
        step after the last micro-batch; return each weighted penalty as ``train/<name>``."""
        ...

    def parameter_gradients(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The gradients of loss_fn(logits) for every trainable parameter, not stored: this rank's own, not
        reduced (replicas); or, when ``partitioned``, this rank's slice of the gradient reduced over ranks, which
        needs every rank to pass the same batch."""
        ...

    def set_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        """The diagonal Fisher (names and shapes as ``parameter_gradients``) for the EWC penalty."""
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
