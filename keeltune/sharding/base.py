"""The small interface between the training loop and a way of spreading the model over ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch


class Backend(Protocol):
    """What the loop needs from a backend; it never asks which backend it has."""

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

    def save(self, folder: Path) -> None:
        """Write model and optimizer state into ``folder`` (called on every rank)."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote."""
        ...

    def export(self, folder: Path) -> None:
        """Write a Hugging Face model folder (safetensors + config) that transformers loads."""
        ...
