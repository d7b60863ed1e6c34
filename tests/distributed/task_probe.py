"""Run under torch's launcher by test_task_ranks: every backend of the job file evaluates the same tasks and
bias probes on this world size (ddp, QLoRA with its adapters made non-zero, ZeRO-3 generating in lockstep);
rank 0 writes each backend's metrics, per-item records and probe log-likelihoods to
``<out>/<backend>-<world>.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from keeltune.config import load_config
from keeltune.distributed import ParallelEnv, exit_rank
from keeltune.eval.bias.probes import bias_results, load_probe_sets
from keeltune.eval.bias.score import score_probe_sets
from keeltune.eval.tasks import prepare_task, run_task
from keeltune.sharding.backends import build_backend
from keeltune.sharding.model import load_tokenizer
from keeltune.training.build import seed_everything


def _adapters_on(backend: object) -> None:
    """LoRA's B starts at zero (adapters off): give every B the same seeded values on every rank."""
    generator = torch.Generator().manual_seed(0)
    for name, param in backend.model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    job = json.loads(Path(sys.argv[1]).read_text())
    parallel = ParallelEnv.from_environment()
    for name, config_file in job["configs"].items():
        config = load_config(config_file)
        tokenizer = load_tokenizer(config.model.tokenizer_path)
        seed_everything(config.training.seed)  # as the trainer: LoRA's A is drawn at random
        backend = build_backend(config, parallel)
        if name == "qlora":
            _adapters_on(backend)
        backend.train(False)
        results: dict[str, object] = {}
        for task in config.eval.tasks:
            prepared = prepare_task(task, tokenizer, max_length=config.data.seq_len)
            outcome = run_task(
                backend,
                prepared,
                tokenizer,
                parallel,
                batch_size=config.eval.task_batch_size,
                bootstrap_iters=50,
            )
            results[task.name] = {"metrics": outcome.metrics, "items": outcome.items}
        probes = load_probe_sets(config.eval.bias)
        lls = score_probe_sets(
            backend, probes, tokenizer, parallel, batch_size=config.eval.task_batch_size, max_length=64
        )
        metrics = {}
        for probe in probes:  # the step-0 lls as the base: amplification 0 on every rank count
            metrics.update(bias_results(probe, lls[probe.name], lls[probe.name], config.eval.bias))
        results["bias"] = {"lls": lls, "metrics": metrics}
        if parallel.is_main:
            out = Path(job["out"]) / f"{name}-{parallel.world_size}.json"
            out.write_text(json.dumps(results))
        del backend
        parallel.barrier()
    parallel.close()


if __name__ == "__main__":
    main()
    exit_rank(0)  # as keeltune's ranks: gloo threads can abort a finished process at interpreter exit
