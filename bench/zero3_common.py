"""Shared set-up of the ZeRO-3 and FSDP2 benchmarks: a random-init Llama, its tokenizer and data, a run folder,
torchrun, storage counting.

The parent process builds everything once in a temporary folder; the ranks (started with torch's launcher on
this same script) only read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from keeltune.config import Config, config_from_dict
from keeltune.demo import corpora
from keeltune.demo.tokenizer import train_tokenizer

HIDDEN, LAYERS, INTERMEDIATE, VOCAB = 512, 4, 1408, 2048


def make_assets(
    workdir: Path, hidden: int = HIDDEN, layers: int = LAYERS, intermediate: int = INTERMEDIATE
) -> tuple[Path, Path]:
    """The model folder (random-init Llama of this shape, tokenizer beside it) and a JSONL of general text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = corpora.general_corpus()["train"]
    model = workdir / "model"
    tokenizer = train_tokenizer(texts, VOCAB, model)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(model)
    return model, corpora.write_jsonl(workdir / "general.jsonl", texts)


def run_config(workdir: Path, model: Path, data: Path, name: str, **training: Any) -> Config:
    """A zero3 (or other backend) run config; W&B disabled, metrics.jsonl every step, no checkpoints."""
    backend = training.pop("backend", "zero3")
    return config_from_dict(
        {
            "run": {"name": name, "root": str(workdir / "runs")},
            "model": {"path": str(model)},
            "data": {
                "seq_len": training.pop("seq_len", 128),
                "train": [{"name": "general", "path": str(data)}],
            },
            "training": {
                "max_steps": 10_000,
                "lr": 1e-4,
                "warmup_steps": 0,
                "precision": "fp32",
                "checkpoint": {"every_steps": 10_000},
                **training,
            },
            "sharding": {"backend": backend},
            "logging": {"every_steps": 1, "wandb": {"mode": "disabled"}},
        }
    )


class Storages:
    """Bytes per category, each storage counted once (by its data pointer) across all categories."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensor: torch.Tensor | None) -> None:
        self.bytes.setdefault(category, 0)
        if tensor is None or not torch.is_tensor(tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()


def join_one_rank_group() -> None:
    """Work around ``ParallelEnv.ensure_process_group`` hanging under torchrun with one rank: it inits a
    ``tcp://`` group on a fresh port, but torchrun's ``TORCHELASTIC_USE_AGENT_STORE`` makes that rank a client
    of a store nobody serves. Joining through torchrun's env:// first makes keeltune skip its own init."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")


def torchrun(script: str, nproc: int, *args: str) -> str:
    """Run ``script`` on ``nproc`` local gloo ranks (one thread each); return its stdout, raise on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    done = subprocess.run(
        [*command, script, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} on {nproc} ranks failed:\n{done.stderr[-4000:]}")
    return done.stdout
