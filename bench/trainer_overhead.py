"""Time per optimizer step: keeltune's loop (metrics.jsonl + W&B offline + progress on) vs a plain PyTorch loop.

Both run in this process on the demo's base architecture (random init: step time does not depend on the
weights), the same packed batches, AdamW with the same groups, fp32, gradient clipping. Repeats are
interleaved (keeltune, plain, keeltune, ...) and the medians compared. Prints ``ratio = keeltune / plain``.

    python bench/trainer_overhead.py [--repeats 5] [--steps 4]
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
import torch.nn.functional as F

from keeltune.config import config_from_dict
from keeltune.demo import corpora
from keeltune.demo.recipe import DEFAULT, llama_config
from keeltune.demo.tokenizer import train_tokenizer
from keeltune.distributed import ParallelEnv
from keeltune.launcher.entry import setup_logging
from keeltune.launcher.run_dir import prepare_run_dir
from keeltune.sharding.model import decay_groups, load_causal_lm
from keeltune.training.trainer import Trainer


def build(workdir: Path) -> Trainer:
    general = corpora.general_corpus()
    data = corpora.write_jsonl(workdir / "general.jsonl", general["train"])
    tokenizer = train_tokenizer(general["train"], DEFAULT.vocab_size, workdir / "base")
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config(DEFAULT, tokenizer)).save_pretrained(workdir / "base")
    schedule = DEFAULT.pretrain
    config = config_from_dict(
        {
            "run": {"name": "bench", "root": str(workdir / "runs")},
            "model": {"path": str(workdir / "base")},
            "data": {"seq_len": DEFAULT.seq_len, "train": [{"name": "general", "path": str(data)}]},
            "training": {
                "max_steps": 10_000,
                "global_batch_size": schedule.batch_size,
                "micro_batch_size": schedule.micro_batch_size,
                "lr": schedule.lr,
                "warmup_steps": 0,
                "precision": "fp32",
                "checkpoint": {"every_steps": 10_000},
            },
            "regularization": {"weight_decay": schedule.weight_decay},
            "logging": {"every_steps": 1, "wandb": {"mode": "offline"}},
        }
    )
    run_dir, _ = prepare_run_dir(config)
    setup_logging(run_dir, 0)
    return Trainer(config, ParallelEnv())


class PlainLoop:
    """The same work with nothing around it: batches, forward, masked mean loss, backward, clip, AdamW."""

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.config
        self.model = load_causal_lm(cfg.model.path)
        self.model.load_state_dict(trainer.backend.model.state_dict())
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, cfg.regularization.weight_decay), lr=cfg.training.lr, betas=(0.9, 0.95)
        )
        self.dataset = trainer.train_sources[0]
        self.batch = cfg.training.global_batch_size
        self.micro = cfg.training.micro_batch_size
        self.position = 0

    def step(self) -> None:
        ids, mask = self.dataset.get(torch.arange(self.position, self.position + self.batch).numpy())
        self.position += self.batch
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask[:, 1:]).float()
        tokens = mask_t.sum()
        for start in range(0, self.batch, self.micro):
            rows = slice(start, start + self.micro)
            logits = self.model(input_ids=ids_t[rows, :-1], use_cache=False).logits
            losses = F.cross_entropy(logits.flatten(0, 1), ids_t[rows, 1:].flatten(), reduction="none")
            ((losses * mask_t[rows].flatten()).sum() / tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(step, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed repeat")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(Path(tmp))
        plain = PlainLoop(trainer)
        timed(trainer.train_one_step, 1)  # warm-up both
        timed(plain.step, 1)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(timed(trainer.train_one_step, args.steps))
            theirs.append(timed(plain.step, args.steps))
        trainer.close()
    keeltune_s, plain_s = statistics.median(ours), statistics.median(theirs)
    params = sum(p.numel() for p in plain.model.parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(
        f"model: demo base architecture, {params / 1e6:.2f}M parameters, batch {plain.batch}x{DEFAULT.seq_len}"
    )
    print(
        f"keeltune loop: median {keeltune_s * 1000:.0f} ms/step  (repeats: {[round(t * 1000) for t in ours]})"
    )
    print(
        f"plain loop:    median {plain_s * 1000:.0f} ms/step  (repeats: {[round(t * 1000) for t in theirs]})"
    )
    print(f"ratio = keeltune / plain = {keeltune_s / plain_s:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
