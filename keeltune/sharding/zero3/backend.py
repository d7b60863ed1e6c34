"""The ZeRO-3 backend: ``deepspeed.initialize`` called directly (accelerate and HF Trainer mis-detect ranks on CPU);
checkpoints are DeepSpeed's own (optimizer state included, resumable with the same number of ranks) plus every
rank's fp32 partition as safetensors, from which ``export`` streams a Hugging Face folder."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keeltune.config import Config, ConfigError
from keeltune.config.backends import fixed_ranks_refusal
from keeltune.config.plan import deepspeed_config, model_hidden_size
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import LocalParameter
from keeltune.sharding.model import (
    add_neftune,
    autocast_dtype,
    decay_groups,
    enable_activation_checkpointing,
    reset_optimizer_state,
)
from keeltune.sharding.tensor_files import large_allocations_returned
from keeltune.sharding.zero3.export import BUFFERS_FILE, LAYOUT_FILE, consolidate, partition_file
from keeltune.sharding.zero3.loading import load_partitioned_model
from keeltune.sharding.zero3.ops import build_ops, needed_ops

DEEPSPEED_TAG = "zero"
# DeepSpeed 0.19 calls collectives that torch 2.13 renamed, with a warning on every call
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)


class Zero3Backend:
    """Full fine-tuning with DeepSpeed ZeRO-3; the loop sees the same interface as plain data parallel."""

    partitioned = True  # each rank holds a slice of every parameter and of its gradient

    def __init__(self, config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> None:
        import deepspeed

        self.parallel = parallel
        build_ops(needed_ops(config, parallel.device))
        parallel.ensure_process_group()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        bf16 = autocast_dtype(config.training.precision, parallel.device) is not None
        self.ds_config = deepspeed_config(
            config, parallel.world_size, bf16=bf16, hidden_size=model_hidden_size(config.model.path)
        )
        with large_allocations_returned():
            model = load_partitioned_model(config, self.ds_config, parallel)
        if config.model.gradient_checkpointing:
            enable_activation_checkpointing(model)
        add_neftune(model, config.regularization.neftune_alpha)
        training = config.training
        groups = decay_groups(model, config.regularization.weight_decay)
        if config.sharding.zero3.offload_optimizer == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=training.lr, betas=tuple(training.betas), eps=training.eps, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(
                groups,
                lr=training.lr,
                betas=tuple(training.betas),
                eps=training.eps,
                fused=parallel.device.type == "cuda",  # one kernel over each flat partition on GPUs
            )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config
        )
        self.model = self.engine.module
        self.reference = self._reference_engine(config) if keep_reference else None

    def forward_backward(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *, sync_grads: bool
    ) -> torch.Tensor:
        logits = self.engine(input_ids=input_ids, use_cache=False).logits
        loss = loss_fn(logits.float())
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already scales by the global batch
        if not sync_grads:
            self.engine.step()  # counts the micro-step; DeepSpeed applies the optimizer only at the boundary
        return loss.detach()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def reset_optimizer(self) -> None:
        reset_optimizer_state(
            self.optimizer.optimizer
        )  # the torch optimizer over this rank's fp32 partitions

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=input_ids, use_cache=False).logits.float()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """Every rank runs every forward until all ranks are done (their batches may need different lengths)."""
        return self.model.generate(input_ids=input_ids, synced_gpus=self.parallel.distributed, **options)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("reference_logits needs a backend built with keep_reference=True")
        return self.reference(input_ids=input_ids, use_cache=False).logits.float()

    def _reference_engine(self, config: Config) -> Any:
        """The base model, frozen and partitioned like the trained one (no gradients, no optimizer state): it
        costs each rank 1/N of the model in the training dtype, plus one gathered layer during its forward."""
        import deepspeed

        with large_allocations_returned():
            reference = load_partitioned_model(config, self.ds_config, self.parallel)
        reference.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=reference, config=self.ds_config)  # forward only
        engine.eval()
        return engine

    def local_parameters(self) -> list[LocalParameter]:
        """This rank's fp32 partitions (flat); a gradient added lands in its partition of the reduced gradient
        before the optimizer step, so clipping sees it as under ddp."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        def adder(param: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
            return lambda gradient: safe_set_local_grad(param, safe_get_local_grad(param) + gradient)

        return [
            LocalParameter(name, safe_get_local_fp32_param(param).detach(), adder(param))
            for name, param in self._named_parameters()
        ]

    def local_gradients(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """This rank's partition of the gradient, reduced over ranks: every rank must pass the same batch (then
        the reduced gradient is that batch's). Leaves no gradient behind and no micro-step counted."""
        from deepspeed.utils import safe_get_local_grad

        self.engine.set_gradient_accumulation_boundary(True)  # reduce and partition in this backward
        try:
            logits = self.engine(input_ids=input_ids, use_cache=False).logits
            self.engine.backward(loss_fn(logits.float()), scale_wrt_gas=False)
            return {
                name: safe_get_local_grad(param).detach().clone() for name, param in self._named_parameters()
            }
        finally:
            self.optimizer.zero_grad()
            self.engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step count

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.model.named_parameters())  # tied weights appear once

    def _write_partitions(self, folder: Path) -> None:
        """This rank's fp32 partition of every parameter; rank 0 adds the layout and persistent buffers."""
        from deepspeed.utils import safe_get_local_fp32_param
        from safetensors.torch import save_file

        params = self._named_parameters()
        save_file(
            {
                name: safe_get_local_fp32_param(p).detach().reshape(-1).cpu().contiguous()
                for name, p in params
            },
            str(partition_file(folder, self.parallel.rank)),
        )
        if self.parallel.is_main:
            layout = {
                "world_size": self.parallel.world_size,
                "params": [[name, list(p.ds_shape)] for name, p in params],
            }
            (folder / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
            buffers = {name: b.detach().cpu().contiguous() for name, b in _persistent_buffers(self.model)}
            if buffers:
                save_file(buffers, str(folder / BUFFERS_FILE))

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)
        self._write_partitions(folder)

    def load(self, folder: Path) -> None:
        layout_file = folder / LAYOUT_FILE
        if not layout_file.is_file():
            raise ConfigError(
                f"{folder}: not a ZeRO-3 checkpoint (no {LAYOUT_FILE}); was it written by another backend?"
            )
        saved = json.loads(layout_file.read_text())["world_size"]
        if saved != self.parallel.world_size:
            raise ConfigError(fixed_ranks_refusal(folder, saved, "ZeRO-3"))
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise ConfigError(f"{folder}: DeepSpeed found no checkpoint under tag {DEEPSPEED_TAG!r}")

    def export(self, folder: Path) -> None:
        parts = folder / ".zero-partitions"
        if self.parallel.is_main:
            parts.mkdir(parents=True, exist_ok=True)
        self.parallel.barrier()
        self._write_partitions(parts)
        self.parallel.barrier()
        if self.parallel.is_main:
            consolidate(parts, folder / "model.safetensors")
            self.model.config.save_pretrained(folder)
            shutil.rmtree(parts)


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = []
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
    return found


def build(config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> Zero3Backend:
    return Zero3Backend(config, parallel, keep_reference=keep_reference)
