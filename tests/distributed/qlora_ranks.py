"""Run by ``test_qlora_parallel`` under torch's launcher: each rank trains the QLoRA backend on its own samples
and writes its LoRA gradients (before and after the all-reduce) and final weights to ``OUT/rank<r>.safetensors``."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from keeltune.config import load_config
from keeltune.distributed import ParallelEnv, exit_rank
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.qlora import QLoraBackend, trainable_state


def _mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_nll(logits, targets, torch.ones(targets.shape)) / targets.numel()


def main(config_file: str, out: str) -> None:
    parallel = ParallelEnv.from_environment()
    torch.manual_seed(0)
    backend = QLoraBackend(load_config(config_file), parallel)
    backend.train(True)
    tensors = {}
    for step in range(3):
        ids = torch.randint(
            3, 500, (2, 33), generator=torch.Generator().manual_seed(10 * step + parallel.rank)
        )
        loss_fn = partial(_mean_nll, targets=ids[:, 1:])
        for sync in (False, True):  # accumulate one local micro-batch, then all-reduce on the second
            backend.forward_backward(ids[:, :-1], loss_fn, sync_grads=sync)
            kind = "synced" if sync else "local"
            for name, param in backend.model.named_parameters():
                if param.requires_grad:
                    tensors[f"{kind}_grad.{step}.{name}"] = param.grad.clone()
        backend.step(1e-2)
    tensors.update({f"weight.{name}": value for name, value in trainable_state(backend.model).items()})
    save_file(tensors, str(Path(out) / f"rank{parallel.rank}.safetensors"))
    parallel.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_rank(0)  # as keeltune's ranks: gloo threads can abort a finished process at interpreter exit
