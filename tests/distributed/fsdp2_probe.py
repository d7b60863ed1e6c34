"""Run under torchrun by test_fsdp2: build the sharded model of a config on every rank and report, as one JSON
line per rank, how much of it the rank holds, whether every parameter is a DTensor sharded on dim 0, and what
loading cost in resident memory."""

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


def main() -> None:
    torch.set_num_threads(1)
    config = load_config(sys.argv[1])
    parallel = ParallelEnv.from_environment()
    parallel.ensure_process_group()
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
