"""Plain data parallel: a full replica on every rank, gradients averaged (torch DDP)."""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel

from keeltune.config import Config
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import LocalParameter
from keeltune.sharding.model import (
    add_neftune,
    autocast_dtype,
    decay_groups,
    enable_activation_checkpointing,
    load_causal_lm,
    reset_optimizer_state,
)


class ReplicaBackend:
    """What backends with a whole replica on every rank share: torch DDP over the trainable parameters, AdamW,
    clipping, bf16 autocast where asked. A subclass sets ``self.model`` and calls ``_replicate``."""

    model: torch.nn.Module
    reference: torch.nn.Module | None = None  # a frozen copy of the pretrained model, when one is kept
    partitioned = False  # every rank holds every trainable parameter

    def _replicate(self, config: Config, parallel: ParallelEnv) -> None:
        self.parallel = parallel
        self.grad_clip = config.training.grad_clip
        self.wrapped: torch.nn.Module = self.model
        if parallel.distributed:
            device_ids = [parallel.device.index] if parallel.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, config.regularization.weight_decay),
            lr=config.training.lr,
            betas=tuple(config.training.betas),
            eps=config.training.eps,
        )
        self.amp_dtype = autocast_dtype(config.training.precision, parallel.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.parallel.device.type, dtype=self.amp_dtype)

    def forward_backward(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *, sync_grads: bool
    ) -> torch.Tensor:
        skip_sync = (
            self.wrapped.no_sync()
            if self.parallel.distributed and not sync_grads
            else contextlib.nullcontext()
        )
        with skip_sync:
            with self._autocast():
                logits = self.wrapped(input_ids=input_ids, use_cache=False).logits
            loss = loss_fn(logits.float())
            loss.backward()
        return loss.detach()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reset_optimizer(self) -> None:
        reset_optimizer_state(self.optimizer)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model(input_ids=input_ids, use_cache=False).logits.float()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        with self._autocast():
            return self.model.generate(input_ids=input_ids, **options)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def local_parameters(self) -> list[LocalParameter]:
        frozen = dict(self.reference.named_parameters()) if self.reference is not None else {}
        return [
            LocalParameter(name, param.detach().float(), _gradient_adder(param), frozen.get(name))
            for name, param in self._trainable().items()
        ]

    def local_gradients(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        params = self._trainable()
        with self._autocast():
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        grads = torch.autograd.grad(loss_fn(logits.float()), list(params.values()), allow_unused=True)
        return {
            n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(params.items(), grads, strict=True)
        }


def _gradient_adder(param: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
    @torch.no_grad()
    def add(gradient: torch.Tensor) -> None:
        if param.grad is None:
            param.grad = gradient.to(param.dtype).clone()
        else:
            param.grad.add_(gradient.to(param.grad.dtype))

    return add


class DDPBackend(ReplicaBackend):
    """Full replicas; the default backend, and the one a single process uses."""

    def __init__(self, config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> None:
        self.model = load_causal_lm(config.model.path, dropout=config.regularization.dropout).to(
            parallel.device
        )
        if config.model.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if keep_reference:  # a frozen copy of the pretrained weights (checkpoints load after this)
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        add_neftune(self.model, config.regularization.neftune_alpha)
        self._replicate(config, parallel)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("reference_logits needs a backend built with keep_reference=True")
        with self._autocast():
            return self.reference(input_ids=input_ids, use_cache=False).logits.float()

    def save(self, folder: Path) -> None:
        if self.parallel.is_main:
            save_model(self.model, str(folder / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        missing, unexpected = load_model(
            self.model, str(folder / "model.safetensors"), device=str(self.parallel.device)
        )
        if missing or unexpected:
            raise ValueError(
                f"{folder}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected})"
            )
        state = torch.load(folder / "optimizer.pt", map_location=self.parallel.device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def export(self, folder: Path) -> None:
        if self.parallel.is_main:
            self.model.save_pretrained(folder, safe_serialization=True)


def build(config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> DDPBackend:
    return DDPBackend(config, parallel, keep_reference=keep_reference)


def export_checkpoint(config: Config, checkpoint: Path, out: Path, *, merge: bool = False) -> list[Path]:
    """A DDP checkpoint already holds the whole model as safetensors: copy it next to the model's config."""
    from transformers import AutoConfig

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors (is this a checkpoint of a ddp run?)")
    out.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(config.model.path, local_files_only=True).save_pretrained(out)
    shutil.copyfile(weights, out / "model.safetensors")
    return [out]
