"""keeltune's FSDP2 backend on CPU (gloo ranks, one thread each): per-rank state bytes, resume on another
number of ranks, and step time against ddp.

1. Memory on 1, 2, 3 and 4 ranks: each rank builds the backend (``build_backend``, fsdp2, fp32), runs a
   forward/backward, one real optimizer step and one more forward/backward, then counts its own storages
   (each once, padding included): parameters and gradients (the local tensors of the DTensors) and AdamW's
   exp_avg and exp_avg_sq. Against an unsharded fp32 replica, 16 B/param; goal ratio <= 1/N + 5%. The
   dry-run estimate (``estimate_gpu_memory(config, N)["model and optimizer states"]``) is printed beside.
2. Resume on 3 ranks: ``keeltune train CFG --nproc 2`` for 2k steps, checkpointing every k; copies of the
   run folder holding only the step-k checkpoint (``final/`` and later checkpoints deleted; the trainer drops
   the metrics after step k) resumed with ``--nproc 3`` and, as a control, ``--nproc 2``. Losses after step
   k compared with the uninterrupted run. Load time: ``Backend.load`` of the step-k checkpoint timed
   directly (between barriers, on a built backend, repeated) on 3 ranks against 2 ranks (baseline); and, to
   tell resharding from 3 processes on the cores, 3 ranks loading the 3-rank run's own step-2k checkpoint.
3. Step time: ``Trainer.train_one_step`` with fsdp2 and with ddp (same config otherwise), at micro-batch 2
   (3 micro-batches per rank) and 6 (one), all four trainers in the same 2 ranks, repeats interleaved,
   medians of rank 0. Reported, not a goal: gloo has no reduce-scatter of its own on CPU.

    python bench/fsdp2.py [--repeats 5] [--steps 2] [--load-repeats 10] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from zero3_common import Storages, make_assets, run_config, torchrun  # noqa: E402

from keeltune.config import Config, config_from_dict  # noqa: E402
from keeltune.launcher.run_dir import prepare_run_dir  # noqa: E402
from keeltune.run_folder import CHECKPOINTS_DIR, CONFIG_FILE, FINAL_MODEL_DIR, METRICS_FILE  # noqa: E402

HIDDEN, LAYERS, INTERMEDIATE = 256, 4, 688
MEMORY_RANKS = (1, 2, 3, 4)  # 3: dim-0 shards of uneven size (256 rows = 86 + 86 + 84)
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 12, 2, 64  # 12 rows divide over 2 and 3 ranks
STEP_MICRO_BATCHES = (MICRO_BATCH, GLOBAL_BATCH // 2)  # 3 micro-batches per rank on 2 ranks, and 1


def bench_config(workdir: Path, model: Path, data: Path, name: str, **training: Any) -> Config:
    """The benchmark's run config: fsdp2 unless ``backend`` says otherwise, fp32, batch 12 x 64 tokens."""
    return run_config(
        workdir,
        model,
        data,
        name,
        backend=training.pop("backend", "fsdp2"),
        global_batch_size=GLOBAL_BATCH,
        seq_len=SEQ_LEN,
        lr=1e-3,
        **{"micro_batch_size": MICRO_BATCH, **training},
    )


def on_ranks(nproc: int, out: Path, mode: str, *args: str) -> list[dict[str, Any]]:
    """This script's ``mode`` on ``nproc`` torchrun ranks; what the ranks wrote into ``out``, by rank."""
    out.mkdir(parents=True)
    torchrun(__file__, nproc, "--rank-main", str(out), mode, *args)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


# ------------------------------------------------------------------------------------------ ranks


def memory_rank(run_dir: Path, parallel: Any) -> dict[str, Any]:
    """One step and one more backward through ``build_backend``; this rank's state storages, by kind."""
    from torch.distributed.tensor import DTensor

    from keeltune.config import load_config
    from keeltune.config.plan import estimate_gpu_memory
    from keeltune.eval.evaluate import token_nll
    from keeltune.sharding.backends import build_backend

    config = load_config(run_dir / CONFIG_FILE)
    backend = build_backend(config, parallel)
    torch.manual_seed(0)
    ids = torch.randint(3, 2000, (MICRO_BATCH, SEQ_LEN + 1))
    tokens = MICRO_BATCH * SEQ_LEN

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return token_nll(logits, ids[:, 1:], torch.ones(MICRO_BATCH, SEQ_LEN)) / tokens

    backend.forward_backward(ids[:, :-1], loss_fn, sync_grads=True)
    backend.step(1e-3)
    backend.forward_backward(ids[:, :-1], loss_fn, sync_grads=True)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    counted, rows = Storages(), {}
    params = list(backend.model.parameters())
    kinds = {
        "params": params,
        "grads": [p.grad for p in params],
        "exp_avg": [backend.optimizer.state[p]["exp_avg"] for p in params],
        "exp_avg_sq": [backend.optimizer.state[p]["exp_avg_sq"] for p in params],
    }
    for kind, tensors in kinds.items():
        for tensor in tensors:
            counted.add(kind, local(tensor))
        rows[kind] = sum(local(t).numel() * local(t).element_size() for t in tensors)
    estimate = estimate_gpu_memory(config, parallel.world_size)["model and optimizer states"] * 1024**3
    return {
        "rank": parallel.rank,
        "bytes": counted.bytes,
        "rows": rows,
        "numel": sum(p.numel() for p in params),
        "not_dtensor": [n for n, p in backend.model.named_parameters() if not isinstance(p, DTensor)],
        "estimate": estimate,
    }


def load_rank(run_dir: Path, checkpoint: Path, repeats: int, parallel: Any) -> dict[str, Any]:
    """``Backend.load`` of ``checkpoint`` ``repeats`` times on a built backend, each timed between barriers."""
    from keeltune.config import load_config
    from keeltune.sharding.backends import build_backend

    backend = build_backend(load_config(run_dir / CONFIG_FILE), parallel)
    seconds = []
    for _ in range(repeats):
        parallel.barrier()
        started = time.perf_counter()
        backend.load(checkpoint)
        parallel.barrier()
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds}


def steps_rank(run_dirs: list[Path], repeats: int, steps: int, parallel: Any) -> dict[str, Any]:
    """``Trainer.train_one_step`` of every run (by folder name), repeats interleaved (a, b, ..., a, b, ...)."""
    from keeltune.config import load_config
    from keeltune.launcher.entry import setup_logging
    from keeltune.training.trainer import Trainer

    trainers = {}
    for run_dir in run_dirs:
        setup_logging(run_dir, parallel.rank)
        trainers[run_dir.name] = Trainer(load_config(run_dir / CONFIG_FILE), parallel)

    def timed(trainer: Trainer, count: int) -> float:
        parallel.barrier()
        started = time.perf_counter()
        for _ in range(count):
            trainer.train_one_step()
        parallel.barrier()
        return (time.perf_counter() - started) / count

    for trainer in trainers.values():  # warm-up
        timed(trainer, 1)
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            seconds[name].append(timed(trainer, steps))
    for trainer in trainers.values():
        trainer.close()
    return seconds


def rank_main(out: Path, mode: str, args: list[str]) -> None:
    """Run ``mode`` on this rank and write its result to ``out/rank<R>.json``."""
    from keeltune.distributed import ParallelEnv, exit_rank

    torch.set_num_threads(1)
    parallel = ParallelEnv.from_environment()
    parallel.ensure_process_group()
    if mode == "memory":
        result = memory_rank(Path(args[0]), parallel)
    elif mode == "load":
        result = load_rank(Path(args[0]), Path(args[1]), int(args[2]), parallel)
    else:
        result = steps_rank([Path(a) for a in args[2:]], int(args[0]), int(args[1]), parallel)
    (out / f"rank{parallel.rank}.json").write_text(json.dumps(result))
    parallel.barrier()
    parallel.close()
    exit_rank(0)  # as keeltune's ranks: gloo threads can abort a finished process at interpreter exit


# ------------------------------------------------------------------------------------------ parent


def cli_train(config: Config, workdir: Path, nproc: int) -> float:
    """``python -m keeltune.cli train CFG --nproc N`` on ``config`` (a YAML file in ``workdir``); seconds."""
    cfg = workdir / f"{config.run.name}-{Path(config.run.root).name}.yaml"
    cfg.write_text(config.to_yaml())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "keeltune.cli", "train", str(cfg), "--nproc", str(nproc)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"keeltune train --nproc {nproc} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def cut_copy(run_dir: Path, root: Path, step: int) -> Path:
    """A copy of a finished run folder under ``root`` as if it had stopped right after step ``step``'s
    checkpoint: later checkpoints and the final model removed (the trainer drops later metrics itself)."""
    copy = root / run_dir.name
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / FINAL_MODEL_DIR)
    for checkpoint in (copy / CHECKPOINTS_DIR).iterdir():
        if int(checkpoint.name.split("_")[1]) > step:
            shutil.rmtree(checkpoint)
    return copy


def memory(workdir: Path, model: Path, data: Path) -> list[tuple[int, list[dict[str, Any]]]]:
    rows = []
    for nproc in MEMORY_RANKS:
        run_dir, _ = prepare_run_dir(bench_config(workdir, model, data, f"memory-{nproc}"))
        rows.append((nproc, on_ranks(nproc, workdir / f"out-memory-{nproc}", "memory", str(run_dir))))
    return rows


def resume(workdir: Path, model: Path, data: Path, k: int, repeats: int) -> dict[str, Any]:
    config = bench_config(
        workdir, model, data, "resume", max_steps=2 * k, checkpoint={"every_steps": k, "keep_last": 3}
    )
    seconds = {"train 2 ranks": cli_train(config, workdir, 2)}
    run_dir = config.run_dir
    checkpoint = run_dir / CHECKPOINTS_DIR / f"step_{k:07d}"
    found = {"uninterrupted": losses(run_dir)}
    for nproc in (3, 2):
        copy = cut_copy(run_dir, workdir / f"resumed-on-{nproc}", k)
        resumed = config.to_dict()
        resumed["run"]["root"] = str(copy.parent)
        seconds[f"resume {nproc} ranks"] = cli_train(config_from_dict(resumed), workdir, nproc)
        log = (copy / "logs" / "rank0.log").read_text()
        if f"resumed from {copy / CHECKPOINTS_DIR / checkpoint.name}" not in log:
            raise RuntimeError(f"the {nproc}-rank run did not resume from {checkpoint.name}:\n{log[-3000:]}")
        found[f"resumed on {nproc}"] = losses(copy)
    written_by_3 = workdir / "resumed-on-3" / run_dir.name / CHECKPOINTS_DIR / f"step_{2 * k:07d}"
    load = {}
    for name, nproc, folder in (
        ("2 ranks", 2, checkpoint),
        ("3 ranks", 3, checkpoint),
        ("3 ranks, 3-rank checkpoint", 3, written_by_3),
    ):
        out = workdir / f"out-load-{len(load)}"
        load[name] = on_ranks(nproc, out, "load", str(run_dir), str(folder), str(repeats))[0]["seconds"]
    size = sum(f.stat().st_size for f in (checkpoint / "dcp").iterdir())
    return {"losses": found, "load": load, "seconds": seconds, "checkpoint_bytes": size}


def step_times(workdir: Path, model: Path, data: Path, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each backend and micro-batch size, by run name (``<backend>-mb<size>``)."""
    dirs = [
        prepare_run_dir(
            bench_config(
                workdir, model, data, f"{backend}-mb{micro}", backend=backend, micro_batch_size=micro
            )
        )[0]
        for micro in STEP_MICRO_BATCHES
        for backend in ("fsdp2", "ddp")
    ]
    return on_ranks(2, workdir / "out-steps", "steps", str(repeats), str(steps), *map(str, dirs))[0]


def print_memory(rows: list[tuple[int, list[dict[str, Any]]]]) -> None:
    numel = rows[0][1][0]["numel"]
    full = 16 * numel
    print(
        f"unsharded fp32 replica: 16 B/param = {full / 2**20:.2f} MiB (params + grads + exp_avg + exp_avg_sq)"
    )
    print(
        "ranks | rank | params MiB | grads MiB | exp_avg MiB | exp_avg_sq MiB | sum MiB | padding B | ratio | goal"
        " | estimate MiB | measured / estimate"
    )
    for nproc, ranks in rows:
        for r in ranks:
            b = r["bytes"]
            total = sum(b.values())
            padding = total - sum(r["rows"].values())
            print(
                f"{nproc} | {r['rank']} | {b['params'] / 2**20:.2f} | {b['grads'] / 2**20:.2f} | "
                f"{b['exp_avg'] / 2**20:.2f} | {b['exp_avg_sq'] / 2**20:.2f} | {total / 2**20:.2f} | {padding} | "
                f"{total / full:.4f} | <= {1 / nproc + 0.05:.3f}{'' if total / full <= 1 / nproc + 0.05 else ' MISSED'}"
                f" | {r['estimate'] / 2**20:.2f} | {total / r['estimate']:.4f}"
            )
            if r["not_dtensor"]:
                print(f"    not DTensors on rank {r['rank']}: {r['not_dtensor']}")


def print_resume(found: dict[str, Any], k: int) -> None:
    size = found["checkpoint_bytes"]
    print(f"checkpoint step {k}: {size / 2**20:.1f} MiB in dcp/ (model + optimizer, written by 2 ranks)")
    load = {name: statistics.median(values) for name, values in found["load"].items()}
    first = {name: values[0] for name, values in found["load"].items()}
    for name, values in found["load"].items():
        print(f"Backend.load on {name}: median {load[name] * 1000:.0f} ms, first {first[name] * 1000:.0f} ms"
              f"  (repeats: {[round(t * 1000) for t in values]})")  # fmt: skip
    for name in list(load)[1:]:
        print(f"ratio = load on {name} / load on 2 ranks = {load[name] / load['2 ranks']:.3f} (medians), "
              f"{first[name] / first['2 ranks']:.3f} (first loads)")  # fmt: skip
    expected = found["losses"]["uninterrupted"]
    for name in ("resumed on 3", "resumed on 2"):
        got = found["losses"][name]
        if sorted(got) != sorted(expected):
            raise RuntimeError(
                f"{name}: steps {sorted(got)}, the uninterrupted run logged {sorted(expected)}"
            )
        after = abs(got[k + 1] - expected[k + 1])
        later = max(abs(got[s] - expected[s]) for s in expected if s > k + 1)
        print(
            f"{name} vs uninterrupted 2-rank run: step {k + 1} |diff| = {after:.2e} "
            f"(loss {expected[k + 1]:.6f}), steps {k + 2}-{2 * k} max |diff| = {later:.2e}; "
            f"steps 1-{k} max |diff| = {max(abs(got[s] - expected[s]) for s in expected if s <= k):.2e}"
        )
    print("CLI wall times (s): " + ", ".join(f"{n} {s:.0f}" for n, s in found["seconds"].items()))


def print_steps(steps: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in steps.items()}
    for name, values in steps.items():
        print(
            f"{name:10s} median {median[name] * 1000:.0f} ms/step  (repeats: {[round(t * 1000) for t in values]})"
        )
    for micro in STEP_MICRO_BATCHES:
        fsdp2, ddp = steps[f"fsdp2-mb{micro}"], steps[f"ddp-mb{micro}"]
        each = [f / d for f, d in zip(fsdp2, ddp, strict=True)]
        print(
            f"micro-batch {micro} ({GLOBAL_BATCH // 2 // micro} per rank): ratio = fsdp2 / ddp = "
            f"{median[f'fsdp2-mb{micro}'] / median[f'ddp-mb{micro}']:.3f} (medians), per repeat "
            f"{[round(r, 2) for r in each]}, median {statistics.median(each):.3f}  (reported, not a goal)"
        )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the steps")
    parser.add_argument("--load-repeats", type=int, default=10, help="timed loads of the checkpoint")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed repeat")
    parser.add_argument("--k", type=int, default=4, help="checkpoint step of the resume part (runs 2k)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, data = make_assets(workdir, hidden=HIDDEN, layers=LAYERS, intermediate=INTERMEDIATE)
        rows = memory(workdir, model, data)
        resumed = resume(workdir, model, data, args.k, args.load_repeats)
        steps = step_times(workdir, model, data, args.repeats, args.steps)
    load_after = os.getloadavg()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"model: Llama hidden {HIDDEN}, {LAYERS} layers, intermediate {INTERMEDIATE}, "
        f"{rows[0][1][0]['numel'] / 1e6:.2f}M parameters, fp32, AdamW; batch {GLOBAL_BATCH}x{SEQ_LEN}, "
        f"micro-batch {MICRO_BATCH} unless said"
    )
    print("\n1. per-rank states")
    print_memory(rows)
    print(
        f"\n2. resume: 2 ranks to step {2 * args.k} (checkpoint every {args.k}), copies resumed at step {args.k}"
    )
    print_resume(resumed, args.k)
    print("\n3. step time on 2 ranks (Trainer.train_one_step)")
    print_steps(steps)
    print(
        f"\n{time.perf_counter() - started:.0f} s in all; load average (1, 5, 15 min) at the start "
        f"{' '.join(f'{v:.2f}' for v in load_before)}, at the end {' '.join(f'{v:.2f}' for v in load_after)}"
    )


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--rank-main":
        rank_main(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        main()
