"""Per-rank bytes of parameters + gradients + optimizer state under keeltune's ZeRO-3 backend on 1, 2 and 4
ranks against an unsharded fp32 replica (16 bytes/param), and the 4-bit QLoRA base against bf16.

ZeRO-3: the ranks are gloo processes started with torch's launcher on this script (each writes its count to a
JSON file). Each builds keeltune's ``Trainer`` (zero3 backend, fp32, default bucket sizes and persistence
threshold 10 x hidden), runs one real optimizer step, then counts real tensors, each storage once (views into
DeepSpeed's flat buffers share it): parameters = every ``p.ds_tensor`` and ``p.data`` (persisted small tensors
stay whole) and the optimizer's flat fp16 partition groups; fp32 master copy = its
``fp32_partitioned_groups_flat`` where these are separate tensors (DeepSpeed means to share them in fp32
training, see docs/benchmarks.md); gradients = the optimizer's ``grad_partitions_flat_buffer`` and any
``.grad``; optimizer state = the inner torch AdamW's ``state`` tensors (exp_avg, exp_avg_sq, step). DeepSpeed's
reduce bucket (``reduce_bucket_size`` elements, a fixed communication buffer) is shown apart.
Goal: ratio <= 1/N + 5%.

QLoRA: ``build_lora_model`` on one process; every ``Linear4bit``'s packed weight plus its quant state (absmax,
code, nested state) against the same weights' ``numel`` x 2 bytes (bf16). Goal: ratio <= 0.30.

    python bench/zero3_memory.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from zero3_common import (  # noqa: E402
    HIDDEN,
    LAYERS,
    Storages,
    join_one_rank_group,
    make_assets,
    run_config,
    torchrun,
)

from keeltune.launcher.run_dir import prepare_run_dir  # noqa: E402

RANKS = (1, 2, 4)


def rank_main(run_dir: Path) -> None:
    from keeltune.config import load_config
    from keeltune.distributed import ParallelEnv
    from keeltune.launcher.entry import setup_logging
    from keeltune.run_folder import CONFIG_FILE
    from keeltune.training.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config(run_dir / CONFIG_FILE)
    setup_logging(run_dir, int(os.environ["RANK"]))
    parallel = ParallelEnv.from_environment()
    join_one_rank_group()
    trainer = Trainer(config, parallel)
    trainer.train_one_step()
    engine = trainer.backend.engine  # type: ignore[attr-defined]
    opt = engine.optimizer
    counted = Storages()
    params = list(engine.module.parameters())
    for p in params:
        counted.add("params", p.ds_tensor)
    for p in params:
        counted.add("params", p.data)
    for flat in opt.fp16_partitioned_groups_flat:
        counted.add("params", flat)
    for flat in opt.fp32_partitioned_groups_flat:  # a second copy unless it shares the flat above
        counted.add("fp32 master", flat)
    counted.add("grads", opt.grad_partitions_flat_buffer)
    for p in [*params, *opt.fp32_partitioned_groups_flat]:
        counted.add("grads", p.grad)
    for state in opt.optimizer.state.values():
        for value in state.values():
            counted.add("optimizer", value)
    for bucket in opt.ipg_buckets.values():
        counted.add("reduce bucket", bucket.buffer)
    report = {
        "rank": parallel.rank,
        "bytes": counted.bytes,
        "numel": sum(p.ds_numel for p in params),
        "persisted": sum(p.ds_numel for p in params if getattr(p, "ds_persist", False)),
    }
    (run_dir / f"memory-rank{parallel.rank}.json").write_text(json.dumps(report))
    trainer.close()
    parallel.barrier()
    parallel.close()


def linear4bit_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(4-bit bytes: packed weights + quant states, bf16 bytes of the same weights, number of layers)."""
    import bitsandbytes as bnb

    counted = Storages()
    bf16 = layers = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            for tensor in (module.weight.data, state.absmax, state.code, state.offset):
                counted.add("4bit", tensor)
            if state.nested:
                counted.add("4bit", state.state2.absmax)
                counted.add("4bit", state.state2.code)
            bf16 += state.shape.numel() * 2
            layers += 1
    return counted.bytes["4bit"], bf16, layers


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, data = make_assets(workdir)
        rows = []
        for nproc in RANKS:
            config = run_config(workdir, model, data, f"z3-{nproc}", global_batch_size=8, micro_batch_size=2)
            run_dir, _ = prepare_run_dir(config)
            torchrun(__file__, nproc, "--rank-main", str(run_dir))
            reports = [json.loads(f.read_text()) for f in run_dir.glob("memory-rank*.json")]
            rows.append((nproc, sorted(reports, key=lambda r: r["rank"])))
        from keeltune.sharding.qlora import build_lora_model

        qlora = run_config(workdir, model, data, "qlora", backend="qlora")
        four_bit, bf16, layers = linear4bit_bytes(build_lora_model(qlora, torch.device("cpu")))

    numel = rows[0][1][0]["numel"]
    full = 16 * numel
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"model: Llama hidden {HIDDEN}, {LAYERS} layers, {numel / 1e6:.2f}M parameters, fp32, AdamW")
    print(f"unsharded replica: 16 B/param = {full / 2**20:.1f} MiB (params + grads + exp_avg + exp_avg_sq)")
    print(f"persisted whole on every rank (< 10 x hidden elements): {rows[0][1][0]['persisted']} parameters")
    print(
        "ranks | rank | params MiB | fp32 master copy MiB | grads MiB | optimizer MiB | sum MiB | ratio | goal"
        " | + bucket MiB"
    )
    for nproc, reports in rows:
        for r in reports:
            b = r["bytes"]
            total = b["params"] + b["fp32 master"] + b["grads"] + b["optimizer"]
            print(
                f"{nproc} | {r['rank']} | {b['params'] / 2**20:.2f} | {b['fp32 master'] / 2**20:.2f} | "
                f"{b['grads'] / 2**20:.2f} | "
                f"{b['optimizer'] / 2**20:.2f} | {total / 2**20:.2f} | {total / full:.4f} | "
                f"<= {1 / nproc + 0.05:.3f} | {b['reduce bucket'] / 2**20:.2f}"
            )
    print(
        f"QLoRA base, {layers} Linear4bit layers: 4-bit {four_bit / 2**20:.2f} MiB vs bf16 {bf16 / 2**20:.2f} MiB, "
        f"ratio = {four_bit / bf16:.4f}  (goal <= 0.30)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-main":
        rank_main(Path(sys.argv[2]))
    else:
        main()
