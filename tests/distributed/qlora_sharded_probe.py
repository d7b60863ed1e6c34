"""Run under torchrun by test_qlora_sharded: build the sharded-base QLoRA backend of a config, take one
backward on a fixed batch (each rank its share) and report, one JSON line per rank: the 4-bit base's bytes this
rank holds against the whole, the states it holds after a step against the dry-run estimate; rank 0 writes the
LoRA gradients (gathered whole) to OUT."""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from keeltune.config import load_config
from keeltune.config.plan import estimate_gpu_memory
from keeltune.distributed import ParallelEnv, exit_rank
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.backends import build_backend

NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def nbytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "quantized_data"):  # torchao NF4: its inner tensors
        return sum(getattr(tensor, part).numel() * getattr(tensor, part).element_size() for part in NF4_PARTS)
    return tensor.numel() * tensor.element_size()


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def main() -> None:
    torch.set_num_threads(1)
    config, out = load_config(sys.argv[1]), sys.argv[2]
    parallel = ParallelEnv.from_environment()
    backend = build_backend(config, parallel)
    model = backend.model
    quantized = [p for p in model.parameters() if hasattr(local(p), "quantized_data")]
    # codes, int8 scales, a float factor per 256 scales; the scales' mean and the 16 NF4 values (float32)
    whole_4bit = sum(p.numel() // 2 + p.numel() // 64 + 4 * (p.numel() // 16384) + 4 * 17 for p in quantized)
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 500, (4, 33), generator=generator)
    share = 4 // parallel.world_size
    mine = ids[parallel.rank * share : (parallel.rank + 1) * share]

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return token_nll(logits, mine[:, 1:], torch.ones(share, 32)) * parallel.world_size / (4 * 32)

    backend.forward_backward(mine[:, :-1], loss_fn, sync_grads=True)
    grads = {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).contiguous()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    if parallel.is_main:
        save_file(grads, out)
    backend.step(1e-3)
    backend.forward_backward(mine[:, :-1], loss_fn, sync_grads=True)
    held = sum(nbytes(local(p)) for p in model.parameters())
    held += sum(nbytes(local(p.grad)) for p in model.parameters() if p.grad is not None)
    held += sum(
        nbytes(local(v))
        for s in backend.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim()
    )
    report = {
        "rank": parallel.rank,
        "held_4bit": sum(nbytes(local(p)) for p in quantized),
        "whole_4bit": whole_4bit,
        "held_states": held,
        "estimate": estimate_gpu_memory(config, parallel.world_size)["model and optimizer states"] * 1024**3,
        "adapters": len(grads),
    }
    print("QLORA_SHARDED_PROBE " + json.dumps(report), flush=True)
    parallel.barrier()
    parallel.close()


if __name__ == "__main__":
    main()
    exit_rank(0)
