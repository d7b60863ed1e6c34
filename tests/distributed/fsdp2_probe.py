"""Run under torchrun by test_fsdp2, one JSON line per rank and config:

- ``load CONFIG``: build the sharded model and report how much of it the rank holds, whether every parameter is
  a DTensor sharded on dim 0, and what loading cost in resident memory;
- ``states CONFIG...``: build the backend of each config, train a step and a backward, and report the bytes of
  the states the rank then holds (its rows of the weights, gradients and optimizer moments) beside the
  dry-run estimate's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from keeltune.config import load_config
from keeltune.distributed import ParallelEnv, exit_rank
from keeltune.sharding.fsdp2 import build_sharded_model
from keeltune.sharding.model import causal_lm_config
from keeltune.sharding.tensor_files import large_allocations_returned


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def held_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's rows of every parameter, gradient and optimizer state tensor."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p) for p in model.parameters()] + [
        local(p.grad) for p in model.parameters() if p.grad is not None
    ]
    tensors += [
        local(v)
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim()
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def states(paths: list[str], parallel: ParallelEnv) -> None:
    from keeltune.config.plan import estimate_gpu_memory
    from keeltune.eval.evaluate import token_nll
    from keeltune.sharding.backends import build_backend

    for path in paths:
        config = load_config(path)
        backend = build_backend(config, parallel)
        ids = torch.randint(3, 500, (1, 17))

        def loss_fn(logits: torch.Tensor, ids: torch.Tensor = ids) -> torch.Tensor:
            return token_nll(logits, ids[:, 1:], torch.ones(1, 16)) / 16

        backend.forward_backward(ids[:, :-1], loss_fn, sync_grads=True)
        backend.step(1e-3)
        backend.forward_backward(ids[:, :-1], loss_fn, sync_grads=True)
        estimate = estimate_gpu_memory(config, parallel.world_size)["model and optimizer states"] * 1024**3
        report = {
            "rank": parallel.rank,
            "config": path,
            "held": held_state_bytes(backend.model, backend.optimizer),
            "estimate": estimate,
        }
        print("FSDP2_PROBE " + json.dumps(report), flush=True)
        parallel.barrier()


def main() -> None:
    torch.set_num_threads(1)
    parallel = ParallelEnv.from_environment()
    parallel.ensure_process_group()
    if sys.argv[1] == "states":
        states(sys.argv[2:], parallel)
        parallel.close()
        return
    config = load_config(sys.argv[2])
    mesh = init_device_mesh("cpu", (parallel.world_size,))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(causal_lm_config(config.model.path))]  # imported before the baseline

    Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM) to now
    rss_before = psutil.Process().memory_info().rss
    with large_allocations_returned():
        model = build_sharded_model(config, mesh, parallel)
    peak_after = _peak_rss()
    params = list(model.parameters())
    report = {
        "rank": parallel.rank,
        "held": sum(p.to_local().numel() for p in params),
        "total": sum(p.numel() for p in params),
        "all_dtensors_on_dim0": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params),
        "load_rss_growth": peak_after - rss_before,
        "model_bytes": sum(p.numel() * 4 for p in params),
    }
    print("FSDP2_PROBE " + json.dumps(report), flush=True)
    parallel.barrier()
    parallel.close()


if __name__ == "__main__":
    main()
    exit_rank(0)  # as keeltune's ranks: gloo threads can abort a finished process at interpreter exit
