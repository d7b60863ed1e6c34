"""Run under torchrun by test_zero3: build the partitioned model of a config on every rank and report, as one
JSON line per rank, how much of it the rank holds and what loading cost in resident memory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import torch

from keeltune.config import load_config
from keeltune.config.plan import deepspeed_config, model_hidden_size
from keeltune.distributed import ParallelEnv, exit_rank
from keeltune.sharding.model import causal_lm_config
from keeltune.sharding.tensor_files import large_allocations_returned
from keeltune.sharding.zero3.loading import load_partitioned_model
from keeltune.sharding.zero3.ops import build_ops


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    config = load_config(sys.argv[1])
    parallel = ParallelEnv.from_environment()
    build_ops(["ShareMemCommBuilder"])
    parallel.ensure_process_group()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ds_config = deepspeed_config(
        config, parallel.world_size, bf16=False, hidden_size=model_hidden_size(config.model.path)
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(causal_lm_config(config.model.path))]  # imported before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # resets this process's peak RSS (VmHWM) to now
    rss_before = psutil.Process().memory_info().rss
    with large_allocations_returned():
        model = load_partitioned_model(config, ds_config, parallel)
    peak_after = _peak_rss()
    params = list(model.parameters())
    report = {
        "rank": parallel.rank,
        "held": sum(p.ds_tensor.numel() for p in params),
        "total": sum(p.ds_numel for p in params),
        "load_rss_growth": peak_after - rss_before,
        "model_bytes": sum(p.ds_numel * 4 for p in params),
    }
    print("ZERO3_PROBE " + json.dumps(report), flush=True)
    parallel.barrier()
    parallel.close()


if __name__ == "__main__":
    main()
    exit_rank(0)  # as keeltune's ranks: gloo threads can abort a finished process at interpreter exit
