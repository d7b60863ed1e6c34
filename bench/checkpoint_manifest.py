"""What a checkpoint's manifest costs: writing a checkpoint with sha256 of every file (the default,
``training.checkpoint.verify: checksum``) vs with sizes only (``size``), and verifying one before a resume.

One process, the ddp backend, a 4-layer hidden-1024 Llama (about 190 MB of fp32 weights, 380 MB of AdamW state
once a step has run). Repeats are interleaved (checksum, size, checksum, ...) and the medians compared. Prints
``ratio = checksum / size`` for writing, and the verification time against the write time.

    python bench/checkpoint_manifest.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from keeltune.config import config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.sharding.ddp import DDPBackend
from keeltune.training.checkpoint import save_checkpoint, verify_on_ranks


def build(workdir: Path) -> DDPBackend:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=8192, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(model_config).save_pretrained(workdir / "base")
    config = config_from_dict(
        {
            "run": {"name": "bench", "root": str(workdir / "runs")},
            "model": {"path": str(workdir / "base")},
            "data": {"train": [{"name": "x", "path": str(workdir / "unused.jsonl")}]},
            "training": {"precision": "fp32"},
        }
    )
    backend = DDPBackend(config, ParallelEnv())
    ids = torch.randint(0, 8192, (2, 128))
    backend.forward_backward(ids, lambda logits: logits.float().mean(), sync_grads=True)
    backend.step(1e-4)  # AdamW state exists, as in any checkpoint after the first step
    return backend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keeltune-bench-") as tmp:
        workdir = Path(tmp)
        backend, parallel = build(workdir), ParallelEnv()
        times: dict[str, list[float]] = {"checksum": [], "size": [], "verify": []}
        step = 0
        for _ in range(args.repeats):
            for mode in ("checksum", "size"):
                step += 1
                started = time.perf_counter()
                folder = save_checkpoint(
                    workdir,
                    step,
                    backend,
                    {"step": step},
                    parallel,
                    keep_last=1,
                    checksums=mode == "checksum",
                )
                times[mode].append(time.perf_counter() - started)
                if mode == "checksum":
                    started = time.perf_counter()
                    assert verify_on_ranks(folder, parallel, checksums=True) == []
                    times["verify"].append(time.perf_counter() - started)
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        medians = {mode: statistics.median(values) for mode, values in times.items()}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"checkpoint: {size_mb:.0f} MB in {len(list(folder.parent.glob('*')))} folder(s); repeats {args.repeats}"
    )
    for mode, value in medians.items():
        print(f"{mode:>9}: median {value:.3f} s  ({', '.join(f'{v:.3f}' for v in times[mode])})")
    print(f"ratio = checksum / size (writing) = {medians['checksum'] / medians['size']:.3f}")
    print(f"verify before resume / write (size only) = {medians['verify'] / medians['size']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
