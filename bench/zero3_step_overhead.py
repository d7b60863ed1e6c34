"""Time per optimizer step: keeltune's ZeRO-3 step (``Trainer.train_one_step``, zero3 backend) against a bare
``deepspeed.initialize`` loop, both in the same 2 torchrun ranks (gloo, one thread each).

keeltune: the loop as users run it (packed-data reader, loss over the global batch's target tokens, metrics.jsonl
every step, progress; W&B disabled). Bare: the same model files loaded with ``from_pretrained`` and handed to
``deepspeed.initialize`` with the same DeepSpeed config dict (``keeltune.config.plan.deepspeed_config``), a torch
AdamW client optimizer, the same batch shape and micro-batches, random token ids made once, mean cross-entropy,
``engine.backward`` / ``engine.step`` per micro-batch. Repeats are interleaved (keeltune, bare, keeltune, ...)
and the medians of rank 0 compared. Prints ``ratio = keeltune / bare``; goal <= 1.05.

    python bench/zero3_step_overhead.py [--repeats 5] [--steps 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from zero3_common import HIDDEN, LAYERS, join_one_rank_group, make_assets, run_config, torchrun  # noqa: E402

from keeltune.launcher.run_dir import prepare_run_dir  # noqa: E402

MARK = "ZERO3_STEP "
NPROC, GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 2, 8, 2, 64


class BareLoop:
    """``deepspeed.initialize`` on the plain model with keeltune's DeepSpeed config, nothing around it."""

    def __init__(self, config, world_size: int) -> None:  # noqa: ANN001 (keeltune Config)
        import deepspeed
        from transformers import AutoModelForCausalLM

        from keeltune.config.plan import deepspeed_config, model_hidden_size

        ds_config = deepspeed_config(
            config, world_size, bf16=False, hidden_size=model_hidden_size(config.model.path)
        )
        model = AutoModelForCausalLM.from_pretrained(config.model.path, local_files_only=True)
        training = config.training
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=training.lr,
            betas=tuple(training.betas),
            eps=training.eps,
            weight_decay=0.0,
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(ds_config)
        )
        rows = training.global_batch_size // world_size
        self.ids = torch.randint(0, model.config.vocab_size, (rows, config.data.seq_len + 1))
        self.micro = training.micro_batch_size

    def step(self) -> None:
        for start in range(0, self.ids.shape[0], self.micro):
            ids = self.ids[start : start + self.micro]
            logits = self.engine(input_ids=ids[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            self.engine.backward(loss)
            self.engine.step()


def timed(step: Callable[[], None], count: int) -> float:
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    for _ in range(count):
        step()
    dist.barrier()
    return (time.perf_counter() - started) / count


def rank_main(run_dir: Path, repeats: int, steps: int) -> None:
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
    bare = BareLoop(config, parallel.world_size)
    timed(trainer.train_one_step, 1)  # warm-up both
    timed(bare.step, 1)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(timed(trainer.train_one_step, steps))
        theirs.append(timed(bare.step, steps))
    if parallel.is_main:
        print(MARK + json.dumps({"keeltune": ours, "bare": theirs}), flush=True)
    trainer.close()
    parallel.barrier()
    parallel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed repeat")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, data = make_assets(workdir)
        config = run_config(
            workdir,
            model,
            data,
            "z3",
            global_batch_size=GLOBAL_BATCH,
            micro_batch_size=MICRO_BATCH,
            seq_len=SEQ_LEN,
        )
        run_dir, _ = prepare_run_dir(config)
        out = torchrun(__file__, NPROC, "--rank-main", str(run_dir), str(args.repeats), str(args.steps))
    line = next(line for line in out.splitlines() if line.startswith(MARK))
    times = json.loads(line[len(MARK) :])
    ours, theirs = statistics.median(times["keeltune"]), statistics.median(times["bare"])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"model: Llama hidden {HIDDEN}, {LAYERS} layers, fp32; {NPROC} ranks, global batch {GLOBAL_BATCH}x{SEQ_LEN}, "
        f"micro-batch {MICRO_BATCH}"
    )
    for name, median, values in (("keeltune", ours, times["keeltune"]), ("bare", theirs, times["bare"])):
        print(f"{name:9s} median {median * 1000:.0f} ms/step  (repeats: {[round(t * 1000) for t in values]})")
    print(f"ratio = keeltune / bare = {ours / theirs:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--rank-main":
        rank_main(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
