"""GPU check: keeltune's full fine-tuning backends and QLoRA on a ~1.1B Llama (random init, seq 2048) against plain
PyTorch and HF Trainer peers.

Parts, in order of importance, each in its own subprocess (one failure or a hang loses only that part; every
result is printed and written to the JSON as soon as it is measured), after ``setup`` (~25 s: tokenizer, model,
data prepared by keeltune). Times per part on one H100 with start-up: 15-30 s each for peak, plain, zero3,
qlora and hf_qlora (measured; 155 s for those and setup); the others estimated, about 6 minutes in all:

1. ``peak`` (~10 s): the card's measured bf16 matmul peak (torch.matmul, 8192 x 8192).
2. ``plain`` (~25 s): a plain PyTorch loop: fp32 weights, bf16 autocast, fused AdamW, grad clip 1.0.
3. ``zero3`` (~30 s): keeltune's real product path: ``Trainer.train_one_step`` with ``sharding.backend: zero3``
   (DeepSpeed ZeRO-3, bf16), reading the packed shards keeltune prepared from a jsonl of random words.
4. ``fsdp2`` (~30 s): the same with ``sharding.backend: fsdp2`` (``sharding.fsdp2.compile: false``).
5. ``hf_zero3`` (~35 s): the peer of ``zero3``: HF ``Trainer`` + DeepSpeed ZeRO-3 with the DeepSpeed config
   keeltune generates for it (``keeltune.config.plan.deepspeed_config``), torch AdamW, bf16, same samples.
6. ``profile`` (~45 s): ``torch.profiler`` over keeltune's ``train_one_step`` (``--profile-backend``, default
   zero3), 2 warm-up + 3 recorded steps: where the time goes by category (sharding hooks, copies, optimizer,
   communication, synchronization, matmuls, attention, other) and the top ops, by self CUDA time (CPU time
   without a GPU), and the GPU's idle share; the summary also in ``gpu_check_profile.json`` and a Chrome trace
   in ``gpu_check_profile_trace.json`` beside the results JSON (gzipped over 16 MiB, the most a device run
   brings back from $OUT; cut to the last step if still larger).
7. ``qlora`` (~30 s): keeltune with ``sharding.backend: qlora`` (nf4 + double quant, LoRA r16 all-linear).
8. ``hf_qlora`` (~30 s): the same QLoRA setup through HF ``Trainer`` + peft, fed the same packed samples.
9. ``fsdp2_compile`` (~90 s, most of it compiling): ``fsdp2`` with ``sharding.fsdp2.compile: true``.

Every sample is a full packed sequence (no padding), so tokens = steps x global batch x seq_len on every side.
Timed steps exclude warm-up steps; the clock runs over whole optimizer steps, data loading included.

Goals (``GOALS``, judged only for the full model on a GPU): the best full fine-tuning backend (zero3, fsdp2 or
fsdp2_compile, by tokens/s) >= 0.9x plain and >= 45% MFU; QLoRA >= 1.3x HF. ``zero3_vs_hf_zero3`` tells whether
the gap between zero3 and plain is DeepSpeed's (about 1) or keeltune's (below 1).

FLOPs per token (model FLOPs, recomputation from gradient checkpointing not counted):
  full fine-tuning: 6*N + 12*L*h*s, QLoRA: 4*N + 6*N_lora + 12*L*h*s (frozen base: forward + input grads),
  N = parameters in matmuls (every transformer linear + lm_head; the embedding lookup is not a matmul),
  attention 12*L*h*s per token = QK^T and AV forward+backward counted over the full s x s square (PaLM's
  convention; a causal kernel does about half: ``mfu_causal`` in the JSON uses 6*L*h*s).
  MFU = tokens/s * FLOPs per token / measured bf16 matmul peak.

    python bench/gpu_check.py [--parts peak,plain,zero3,...] [--steps 10] [--profile-backend zero3] [--tiny]

``--tiny`` runs the same code paths on CPU (hidden 64, 2 layers, seq 64, fp32, 2 steps): a logic check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_SHAPE: Shape  # the shape of this invocation (set in main)
PARTS = ("peak", "plain", "zero3", "fsdp2", "hf_zero3", "profile", "qlora", "hf_qlora", "fsdp2_compile")
TRAINING_PARTS = ("plain", "zero3", "fsdp2", "fsdp2_compile", "hf_zero3", "qlora", "hf_qlora")
FULL_FT_BACKENDS = (
    "zero3",
    "fsdp2",
    "fsdp2_compile",
)  # keeltune's full fine-tuning parts: the best is judged
RATIOS = {  # derived key -> (numerator part, denominator part), tokens/s
    "zero3_vs_plain": ("zero3", "plain"),
    "hf_zero3_vs_plain": ("hf_zero3", "plain"),
    "zero3_vs_hf_zero3": ("zero3", "hf_zero3"),  # above 1: the gap to plain is DeepSpeed's, not keeltune's
    "qlora_vs_hf": ("qlora", "hf_qlora"),
}
RESULT_PREFIX = "GPU_CHECK_RESULT "
GOALS = {"best_full_ft_vs_plain": 0.9, "best_full_ft_mfu": 0.45, "qlora_vs_hf": 1.3}
PROFILE_WARMUP, PROFILE_ACTIVE = 2, 3  # profiled steps: the first two only warm the profiler up
TRACE_LIMIT_BYTES = 16 * 2**20  # the largest file a device run brings back from $OUT


@dataclass
class Shape:
    """The model and batch shape of a check."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    micro_batch: int
    global_batch: int
    warmup: int
    steps: int
    matmul_n: int
    gradient_checkpointing: bool

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def matmul_params(self) -> int:
        """Parameters in matmuls: q, k, v, o, gate, up, down of every layer, and the (untied) lm_head."""
        kv_dim = self.hidden // self.heads * self.kv_heads
        per_layer = self.hidden * (2 * self.hidden + 2 * kv_dim) + 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.vocab * self.hidden

    def attention_flops(self) -> int:
        """Per token, forward + backward, full s x s square (halve it for causal-only kernels)."""
        return 12 * self.layers * self.hidden * self.seq_len

    def flops_per_token(self, lora_params: int | None = None) -> int:
        if lora_params is None:
            return 6 * self.matmul_params() + self.attention_flops()
        return 4 * self.matmul_params() + 6 * lora_params + self.attention_flops()


GPU_SHAPE = Shape(2048, 5632, 22, 16, 4, 32000, 2048, 4, 8, 3, 10, 8192, False)
TINY_SHAPE = Shape(64, 128, 2, 4, 2, 512, 64, 2, 4, 1, 2, 256, False)


# --------------------------------------------------------------------------- helpers run inside a part


def device() -> Any:
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory() -> dict[str, float | None]:
    """Peak GPU memory of this process, GiB (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    return {
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def timing(shape: Shape, seconds: float) -> dict[str, Any]:
    tokens = shape.steps * shape.tokens_per_step
    return {
        "timed_steps": shape.steps,
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "step_s": round(seconds / shape.steps, 4),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def keeltune_config(
    work: Path, shape: Shape, backend: str, settings: dict[str, Any] | None = None, name: str | None = None
) -> Any:
    """The keeltune config of a check part: one jsonl source, prepared once into a shared folder; ``settings``
    go to the backend's own section (``sharding.<backend>``), ``name`` names the run (default: the backend)."""
    from keeltune.config import config_from_dict

    cuda = device().type == "cuda"
    return config_from_dict(
        {
            "run": {"name": name or backend, "root": str(work / "runs")},
            "model": {"path": str(work / "model"), "gradient_checkpointing": shape.gradient_checkpointing},
            "data": {
                "seq_len": shape.seq_len,
                "train": [{"name": "random", "path": str(work / "train.jsonl")}],
                "prepared_dir": str(work / "prepared"),
                "prepare_workers": min(8, os.cpu_count() or 1),
                # random words have no near copies to find; and that search needs datasketch and scipy,
                # which the GPU image lacks (and bench/wheels has no room for)
                "dedup": {"near": False},
            },
            "training": {
                "max_steps": 1_000_000,
                "global_batch_size": shape.global_batch,
                "micro_batch_size": shape.micro_batch,
                "lr": 1e-4,
                "warmup_steps": 0,
                "precision": "bf16" if cuda else "fp32",
                "checkpoint": {"every_steps": 1_000_000},
            },
            "sharding": {"backend": backend, **({backend: settings} if settings else {})},
            "eval": {"at_start": False},
            "logging": {"every_steps": 1, "wandb": {"mode": "disabled"}},
        }
    )


def steps_needed(shape: Shape) -> int:
    """Optimizer steps of the longest part: warm-up + timed, or the profile's steps."""
    return max(shape.warmup + shape.steps, PROFILE_WARMUP + PROFILE_ACTIVE)


def packed_samples(work: Path, shape: Shape) -> Any:
    """keeltune's prepared packed dataset (the same samples the keeltune parts train on)."""
    from keeltune.distributed import ParallelEnv
    from keeltune.sharding.model import load_tokenizer
    from keeltune.training.build import build_datasets

    config = keeltune_config(work, shape, "ddp")
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    train, _ = build_datasets(config, tokenizer, ParallelEnv())
    needed = steps_needed(shape) * shape.global_batch
    if len(train[0]) < needed:
        raise RuntimeError(f"prepared data holds {len(train[0])} samples, the check needs {needed}")
    return train[0]


# --------------------------------------------------------------------------- the parts


def part_setup(work: Path, shape: Shape) -> dict[str, Any]:
    """Tokenizer (one word = one token), random-init Llama saved as safetensors, random text, prepared shards."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from keeltune.data_pipeline.prepare import prepare_sets
    from keeltune.sharding.model import load_tokenizer

    folder = work / "model"
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
    words = [f"w{i}" for i in range(shape.vocab - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[2],
        unk_token=specials[3],
    ).save_pretrained(folder)

    model_config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.seq_len,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device()):
        model = LlamaForCausalLM(model_config)
    if device().type == "cuda":
        model.to(torch.bfloat16)  # half the bytes to write and read back; every part loads its own dtype
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    model_s = time.perf_counter() - started

    # random words, documents of 1000-3000 words: enough packed samples for the longest part, with margin
    needed_tokens = int((steps_needed(shape) + 2) * shape.global_batch * (shape.seq_len + 1) * 1.2)
    rng = random.Random(0)
    written = 0
    with open(work / "train.jsonl", "w") as out:
        while written < needed_tokens:
            length = rng.randint(1000, 3000)
            out.write(json.dumps({"text": " ".join(rng.choices(words, k=length))}) + "\n")
            written += length
    started = time.perf_counter()
    config = keeltune_config(work, shape, "ddp")
    prepare_sets(config.data, config.run_dir, load_tokenizer(str(folder)), refresh=False)
    samples = len(packed_samples(work, shape))
    return {
        "params": params,
        "matmul_params": shape.matmul_params(),
        "model_build_save_s": round(model_s, 1),
        "prepare_s": round(time.perf_counter() - started, 1),
        "packed_samples": samples,
    }


def part_peak(work: Path, shape: Shape) -> dict[str, Any]:
    """Measured matmul throughput: bf16 on CUDA, fp32 on CPU (tiny mode)."""
    import torch

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = shape.matmul_n
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    iterations = 50 if dev.type == "cuda" else 5
    for _ in range(5):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(3):  # best of three rounds: clocks ramp up, the first round can be slow
        sync()
        started = time.perf_counter()
        for _ in range(iterations):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - started)
    tflops = 2 * n**3 * iterations / best / 1e12
    return {"matmul_n": n, "dtype": str(dtype).replace("torch.", ""), "peak_tflops": float(f"{tflops:.4g}")}


def part_plain(work: Path, shape: Shape) -> dict[str, Any]:
    """Plain PyTorch: fp32 weights, bf16 autocast (CUDA), fused AdamW, clip 1.0, masked token-mean loss."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from keeltune.sharding.model import enable_activation_checkpointing

    dev = device()
    dataset = packed_samples(work, shape)
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32).to(dev)
    if shape.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    )
    position = 0
    losses: list[float] = []

    def step() -> None:
        nonlocal position
        ids, mask = dataset.get(np.arange(position, position + shape.global_batch))
        position += shape.global_batch
        ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
        mask_t = torch.from_numpy(mask[:, 1:]).float().to(dev, non_blocking=True)
        targets = mask_t.sum()
        total = torch.zeros((), device=dev)
        for start in range(0, shape.global_batch, shape.micro_batch):
            rows = slice(start, start + shape.micro_batch)
            with autocast:
                logits = model(input_ids=ids_t[rows, :-1], use_cache=False).logits
            nll = F.cross_entropy(logits.float().flatten(0, 1), ids_t[rows, 1:].flatten(), reduction="none")
            loss = (nll * mask_t[rows].flatten()).sum() / targets
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # one sync per step, as keeltune's loop has

    for _ in range(shape.warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(shape.steps):
        step()
    sync()
    return {
        **timing(shape, time.perf_counter() - started),
        **memory(),
        "flops_per_token": shape.flops_per_token(),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }


def _keeltune_trainer(
    work: Path, shape: Shape, backend: str, settings: dict[str, Any] | None = None, name: str | None = None
) -> tuple[Any, Any, float]:
    """keeltune's Trainer for a backend, its run folder prepared: (config, trainer, build seconds)."""
    from keeltune.distributed import ParallelEnv
    from keeltune.launcher.run_dir import prepare_run_dir
    from keeltune.training.trainer import Trainer

    config = keeltune_config(work, shape, backend, settings, name)
    prepare_run_dir(config)
    started = time.perf_counter()
    trainer = Trainer(config, ParallelEnv.from_environment())
    return config, trainer, time.perf_counter() - started


def _keeltune(
    work: Path, shape: Shape, backend: str, settings: dict[str, Any] | None = None, name: str | None = None
) -> dict[str, Any]:
    """keeltune's Trainer, one ``train_one_step`` at a time (what ``fit`` runs, without eval/checkpoints)."""
    from keeltune.run_folder import METRICS_FILE

    config, trainer, build_s = _keeltune_trainer(work, shape, backend, settings, name)
    lora = None
    if backend == "qlora":
        lora = sum(p.numel() for p in trainer.backend.model.parameters() if p.requires_grad)
    for _ in range(shape.warmup):
        trainer.train_one_step()
    sync()
    started = time.perf_counter()
    for _ in range(shape.steps):
        trainer.train_one_step()
    sync()
    seconds = time.perf_counter() - started
    trainer.close()
    records = [json.loads(line) for line in (config.run_dir / METRICS_FILE).read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    return {
        **timing(shape, seconds),
        **memory(),
        "flops_per_token": shape.flops_per_token(lora),
        "trainable_params": lora,
        "build_s": round(build_s, 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "path": f"keeltune Trainer.train_one_step, sharding.backend={backend}"
        + (f", sharding.{backend}={json.dumps(settings)}" if settings else ""),
    }


def part_zero3(work: Path, shape: Shape) -> dict[str, Any]:
    return _keeltune(work, shape, "zero3")


def part_fsdp2(work: Path, shape: Shape) -> dict[str, Any]:
    return _keeltune(work, shape, "fsdp2", {"compile": False})


def part_fsdp2_compile(work: Path, shape: Shape) -> dict[str, Any]:
    return _keeltune(work, shape, "fsdp2", {"compile": True}, name="fsdp2_compile")


def part_qlora(work: Path, shape: Shape) -> dict[str, Any]:
    return _keeltune(work, shape, "qlora")


def _hf_train(work: Path, shape: Shape, model: Any, args: Any, **trainer_options: Any) -> dict[str, Any]:
    """HF ``Trainer`` over the packed samples (input = label), timed by callbacks at every step's end."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, default_data_collator

    dataset = packed_samples(work, shape)
    ids, _ = dataset.get(np.arange((shape.warmup + shape.steps) * shape.global_batch))
    rows = [{"input_ids": torch.from_numpy(row[:-1]), "labels": torch.from_numpy(row[:-1])} for row in ids]
    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=default_data_collator,
        callbacks=[Clock()],
        **trainer_options,
    )
    trainer.train()
    if len(ends) != shape.warmup + shape.steps:
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {shape.warmup + shape.steps}")
    return {
        **timing(shape, ends[-1] - ends[shape.warmup - 1]),
        **memory(),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
    }


def _hf_arguments(work: Path, shape: Shape, name: str, **options: Any) -> Any:
    """HF ``TrainingArguments`` of the check's batch: constant lr 1e-4, clip 1.0, a loss log every step."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(work / name),
        max_steps=shape.warmup + shape.steps,
        per_device_train_batch_size=shape.micro_batch,
        gradient_accumulation_steps=shape.global_batch // shape.micro_batch,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=1,  # one loss sync per step, as keeltune's loop has
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        **options,
    )


def part_hf_zero3(work: Path, shape: Shape) -> dict[str, Any]:
    """HF Trainer + DeepSpeed ZeRO-3 with the DeepSpeed config keeltune generates for the ``zero3`` part, the
    same model and samples, torch AdamW (fused on CUDA, as keeltune's): nothing for DeepSpeed to compile."""
    import copy
    import socket

    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    from keeltune.config.plan import deepspeed_config, model_hidden_size
    from keeltune.sharding.model import autocast_dtype
    from keeltune.sharding.zero3.ops import build_ops, needed_ops

    dev = device()
    cuda = dev.type == "cuda"
    config = keeltune_config(work, shape, "zero3")
    training = config.training
    bf16 = autocast_dtype(training.precision, dev) is not None  # what keeltune's zero3 backend decides
    ds_config = deepspeed_config(config, 1, bf16=bf16, hidden_size=model_hidden_size(config.model.path))
    with socket.socket() as probe:  # a one-rank process group, as a launcher would set it up
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    build_ops(needed_ops(config, dev))  # keeltune's build folder: DeepSpeed's CPU comm op, built once
    if not cuda:  # accelerate leaves the backend unset on CPU and mis-counts ranks: configure its state first
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    started = time.perf_counter()
    args = _hf_arguments(
        work,
        shape,
        "hf_zero3",
        bf16=bf16,
        gradient_checkpointing=shape.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=copy.deepcopy(ds_config),  # HF fills in and checks it; the JSON keeps keeltune's own
        accelerator_config={"use_configured_state": not cuda},
    )
    # after the arguments: HF builds the model under deepspeed.zero.Init only while their DeepSpeed config lives
    model = AutoModelForCausalLM.from_pretrained(
        str(work / "model"), dtype=torch.bfloat16 if bf16 else torch.float32
    )
    model.config.use_cache = False  # keeltune's forward passes use_cache=False
    build_s = time.perf_counter() - started
    adamw = {"lr": training.lr, "betas": tuple(training.betas), "eps": training.eps, "fused": cuda}
    result = _hf_train(work, shape, model, args, optimizer_cls_and_kwargs=(torch.optim.AdamW, adamw))
    return {
        **result,
        "flops_per_token": shape.flops_per_token(),
        "build_s": round(build_s, 1),
        "path": "transformers Trainer + DeepSpeed ZeRO-3 (keeltune's deepspeed_config), torch.optim.AdamW",
        "deepspeed_config": ds_config,
    }


def part_hf_qlora(work: Path, shape: Shape) -> dict[str, Any]:
    """HF Trainer + peft, the QLoRA settings of keeltune's defaults, the same packed samples (input = label)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from keeltune.config import QLoraConfig

    dev = device()
    cuda = dev.type == "cuda"
    q = QLoraConfig()  # keeltune's defaults, which the qlora part runs with
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(work / "model"), dtype=torch.float32, quantization_config=quantization, device_map={"": str(dev)}
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=shape.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(
        r=q.rank,
        lora_alpha=q.alpha,
        lora_dropout=q.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.config.use_cache = False  # keeltune's forward passes use_cache=False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    build_s = time.perf_counter() - started
    args = _hf_arguments(work, shape, "hf_qlora", optim="adamw_torch", bf16=cuda, use_cpu=not cuda)
    return {
        **_hf_train(work, shape, model, args),
        "flops_per_token": shape.flops_per_token(trainable),
        "trainable_params": trainable,
        "build_s": round(build_s, 1),
        "path": "transformers Trainer + peft (prepare_model_for_kbit_training, get_peft_model)",
    }


PROFILE_CATEGORIES = (
    "sharding_hooks", "memcpy", "optimizer", "communication", "sync", "matmul", "attention", "other"
)  # fmt: skip
SYNC_OPS = {
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
    "aten::_local_scalar_dense",
}  # fmt: skip
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
COMM_WORDS = (
    "c10d::", "nccl", "gloo", "all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce",
    "broadcast", "record_param_comms",
)  # fmt: skip
# profiler ranges (record_function names), which categorize what runs inside them, not by their own name
RANGE_PREFIXES = ("deepspeed::", "FSDP::", "Optimizer.", "keeltune::", "ProfilerStep#")
WHOLE_PASSES = ("deepspeed::DeepSpeedEngine.forward", "deepspeed::DeepSpeedEngine.backward")  # not hooks
CATEGORY_RULE = (
    "the op's own name or, failing that, the nearest enclosing op's (a kernel launch inside aten::mm is a "
    "matmul; sync: cuda*Synchronize, aten::item, aten::_local_scalar_dense; communication: "
    "c10d/nccl/gloo, all_gather, reduce_scatter, all_reduce, broadcast; memcpy: *copy*, Memcpy*; matmul: "
    "aten::mm/addmm/bmm/baddbmm/matmul/linear; attention: *attention*, *sdpa*), else the ranges around it: "
    "optimizer if inside the backend's step (keeltune::backend.step: DeepSpeed's ZeRO step, its last gradient "
    "reduction included, or FSDP2's clip + AdamW) or an Optimizer.* range, sharding_hooks if inside a "
    "deepspeed:: range (DeepSpeed's instrumented functions and module hooks, not the engine's whole forward "
    "or backward) or an FSDP:: range, else other (the model's other ops, Python outside any op)"
)


def op_category(name: str) -> str | None:
    """The category an op's own name gives; None leaves it to the ops and ranges around it."""
    lower = name.lower()
    if name in SYNC_OPS:
        return "sync"
    if any(word in lower for word in COMM_WORDS):
        return "communication"
    if "copy" in lower or "memcpy" in lower:
        return "memcpy"
    if name in MATMUL_OPS:
        return "matmul"
    if "attention" in lower or "sdpa" in lower:
        return "attention"
    return None


def event_category(event: Any) -> str:
    """A profiler event's category (``CATEGORY_RULE``)."""
    ranges = []
    node = event
    while node is not None:
        if node.name.startswith(RANGE_PREFIXES):
            ranges.append(node.name)
        elif own := op_category(node.name):
            return own
        node = node.cpu_parent
    if any(name.startswith(("keeltune::backend.step", "Optimizer.")) for name in ranges):
        return "optimizer"
    if any(name.startswith(("deepspeed::", "FSDP::")) and name not in WHOLE_PASSES for name in ranges):
        return "sharding_hooks"
    return "other"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, in seconds (streams overlap)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def profile_summary(events: Any, cuda: bool, wall_s: float, top: int = 15) -> dict[str, Any]:
    """Where the recorded steps' time goes, per category and per op: self CUDA time (self CPU time on CPU)."""
    from torch.autograd import DeviceType

    basis = "self_cuda_s" if cuda else "self_cpu_s"
    categories = {name: {"self_cpu_s": 0.0, "self_cuda_s": 0.0} for name in PROFILE_CATEGORIES}
    ops: dict[tuple[str, str], dict[str, Any]] = {}
    kernels: list[tuple[float, float]] = []
    for event in events:
        if event.device_type != DeviceType.CPU:
            if not event.is_user_annotation:  # kernels, copies, memsets (not the ranges' GPU shadows)
                kernels.append((event.time_range.start, event.time_range.end))
            continue
        if event.is_async:
            continue
        category = event_category(event)
        name = "ProfilerStep#*" if event.name.startswith("ProfilerStep#") else event.name
        op = ops.setdefault(
            (name, category),
            {"name": name, "category": category, "calls": 0, "self_cpu_s": 0.0, "self_cuda_s": 0.0},
        )
        op["calls"] += 1
        for key, value in (
            ("self_cpu_s", event.self_cpu_time_total),
            ("self_cuda_s", event.self_device_time_total),
        ):
            op[key] += value / 1e6
            categories[category][key] += value / 1e6
    total = sum(values[basis] for values in categories.values()) or 1.0
    keys = ("self_cpu_s", "self_cuda_s") if cuda else ("self_cpu_s",)

    def rounded(values: dict[str, Any]) -> dict[str, Any]:
        kept = {key: value for key, value in values.items() if key not in ("self_cpu_s", "self_cuda_s")}
        return {
            **kept,
            **{key: round(values[key], 4) for key in keys},
            "share": round(values[basis] / total, 4),
        }

    summary: dict[str, Any] = {
        "basis": basis,
        "recorded_steps": PROFILE_ACTIVE,
        "profiled_step_s": round(wall_s / PROFILE_ACTIVE, 4),
        "categories": {name: rounded(values) for name, values in categories.items()},
        "top_ops": [rounded(op) for op in sorted(ops.values(), key=lambda op: -op[basis])[:top]],
        "category_rule": CATEGORY_RULE,
    }
    if cuda:
        busy = busy_seconds(kernels)
        summary["device_busy_s"] = round(busy, 4)
        summary["device_idle_share"] = round(1 - busy / wall_s, 4)
    return summary


def annotate_deepspeed() -> None:
    """Turn DeepSpeed's NVTX ranges (every ``instrument_w_nvtx`` function: parameter fetch and release, gradient
    reduction and partitioning, the ZeRO step) and its four module hooks into profiler ranges
    ``deepspeed::<qualified name>``; the profiler does not record NVTX ranges."""
    import functools
    import threading

    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from torch.profiler import record_function

    local = threading.local()  # backward hooks run on autograd's threads: one stack of open ranges each

    def push(message: str, *args: Any, **kwargs: Any) -> None:
        local.__dict__.setdefault("open", []).append(record_function(f"deepspeed::{message}").__enter__())

    def pop(*args: Any, **kwargs: Any) -> None:
        local.open.pop().__exit__(None, None, None)

    accelerator = get_accelerator()
    accelerator.range_push, accelerator.range_pop = push, pop
    for name in (
        "pre_sub_module_forward_function",
        "post_sub_module_forward_function",
        "pre_sub_module_backward_function",
        "post_sub_module_backward_function",
    ):
        method = getattr(DeepSpeedZeRoOffload, name)

        @functools.wraps(method)
        def ranged(self: Any, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            with record_function(f"deepspeed::DeepSpeedZeRoOffload.{_name}"):
                return _method(self, *args, **kwargs)

        setattr(DeepSpeedZeRoOffload, name, ranged)


def profile_paths(out_file: Path) -> tuple[Path, Path]:
    """(summary JSON, Chrome trace) of the profile part, next to the results JSON."""
    return (
        out_file.with_name(f"{out_file.stem}_profile.json"),
        out_file.with_name(f"{out_file.stem}_profile_trace.json"),
    )


def write_trace(prof: Any, trace: Path) -> tuple[Path, int]:
    """The Chrome trace, within ``TRACE_LIMIT_BYTES``: gzipped when larger, and cut to the last recorded step
    when even that is larger. Returns the file written (``.json`` or ``.json.gz``) and the steps it holds."""
    import gzip

    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    packed = Path(f"{trace}.gz")
    packed.unlink(missing_ok=True)
    if trace.stat().st_size <= TRACE_LIMIT_BYTES:
        return trace, PROFILE_ACTIVE
    with open(trace, "rb") as raw, gzip.open(packed, "wb") as out:
        shutil.copyfileobj(raw, out)
    steps = PROFILE_ACTIVE
    if packed.stat().st_size > TRACE_LIMIT_BYTES:
        data = json.loads(trace.read_text())
        events = data["traceEvents"]
        last = max(float(e["ts"]) for e in events if str(e.get("name", "")).startswith("ProfilerStep#"))
        data["traceEvents"] = [e for e in events if "ts" not in e or float(e["ts"]) >= last]
        with gzip.open(packed, "wt") as out:
            json.dump(data, out)
        steps = 1
    trace.unlink()
    return packed, steps


def part_profile(work: Path, shape: Shape, backend: str, out_file: Path) -> dict[str, Any]:
    """torch.profiler over keeltune's ``train_one_step`` (2 warm-up + 3 recorded steps, no shapes or stacks):
    the summary (also written next to the results JSON) and a Chrome trace (``write_trace``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    cuda = torch.cuda.is_available()
    if backend == "zero3":
        annotate_deepspeed()
    settings = {"compile": False} if backend == "fsdp2" else None
    _, trainer, build_s = _keeltune_trainer(work, shape, backend, settings, name=f"profile_{backend}")
    step = trainer.backend.step

    def annotated_step(lr: float) -> float:
        with record_function("keeltune::backend.step"):
            return step(lr)

    trainer.backend.step = annotated_step
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    wall_s = 0.0
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=PROFILE_WARMUP, active=PROFILE_ACTIVE, repeat=1),
        record_shapes=False,
        with_stack=False,
    ) as prof:
        for index in range(PROFILE_WARMUP + PROFILE_ACTIVE):
            started = time.perf_counter()
            trainer.train_one_step()
            sync()
            if index >= PROFILE_WARMUP:
                wall_s += time.perf_counter() - started
            prof.step()
    trainer.close()
    summary_file, trace = profile_paths(out_file)
    trace, trace_steps = write_trace(prof, trace)
    summary = {
        "backend": backend,
        "warmup_steps": PROFILE_WARMUP,
        **profile_summary(prof.events(), cuda, wall_s),
        "build_s": round(build_s, 1),
        "trace": str(trace),
        "trace_steps": trace_steps,
        "trace_mib": round(trace.stat().st_size / 2**20, 2),
    }
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------- orchestration


def run_part(name: str, work: Path, args: argparse.Namespace) -> None:
    """Inside the subprocess: run one part and print its result on one line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    if name == "profile":
        result = part_profile(work, args.shape, args.profile_backend, args.out_file)
    else:
        result = globals()[f"part_{name}"](work, args.shape)
    result["part_s"] = round(time.perf_counter() - started, 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn(name: str, work: Path, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """One part in a fresh process; its output is streamed, its result line parsed."""
    command = [sys.executable, __file__, "--part", name, "--workdir", str(work), *args.passthrough]
    print(f"\n=== {name} (timeout {timeout_s:.0f} s) ===", flush=True)
    started = time.perf_counter()
    result: dict[str, Any] = {}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    try:
        deadline = started + timeout_s
        assert process.stdout is not None
        with contextlib.suppress(ValueError):
            for line in iter(process.stdout.readline, ""):
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX) :])
                else:
                    tail = (tail + [line.rstrip()])[-30:]
                    if args.verbose:
                        print(f"  [{name}] {line.rstrip()}", flush=True)
                if time.perf_counter() > deadline:
                    raise subprocess.TimeoutExpired(command, timeout_s)
        process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"error": f"timed out after {timeout_s:.0f} s", "log_tail": tail[-15:]}
    if process.returncode != 0 or not result:
        if not args.verbose:
            print("\n".join(f"  [{name}] {line}" for line in tail), flush=True)
        last = next((line.strip() for line in reversed(tail) if line.strip()), "")  # the exception, usually
        return {"error": f"exit status {process.returncode}: {last}"[:300], "log_tail": tail[-15:]}
    print(
        f"  {name}: {json.dumps(result)}  ({time.perf_counter() - started:.0f} s with start-up)", flush=True
    )
    return result


def derived(results: dict[str, Any], cuda: bool, tiny: bool) -> dict[str, Any]:
    """MFU per training part, the ratios between parts, the best full fine-tuning backend, and the goals."""
    peak = results.get("peak", {}).get("peak_tflops")
    out: dict[str, Any] = {}
    for name in TRAINING_PARTS:
        part = results.get(name, {})
        if "tokens_per_s" not in part:
            continue
        achieved = part["tokens_per_s"] * part["flops_per_token"] / 1e12
        part["model_tflops"] = round(achieved, 1)
        if cuda and peak:
            part["mfu"] = round(achieved / peak, 4)
            half = part["tokens_per_s"] * _SHAPE.attention_flops() / 2 / 1e12
            part["mfu_causal"] = round((achieved - half) / peak, 4)
        else:
            part["mfu"] = None  # no bf16 peak on CPU: MFU is n/a

    def ratio(a: str | None, b: str) -> float | None:
        x = results.get(a, {}).get("tokens_per_s") if a else None
        y = results.get(b, {}).get("tokens_per_s")
        return round(x / y, 3) if x and y else None

    for key, (a, b) in RATIOS.items():
        out[key] = ratio(a, b)
    out["zero3_mfu"] = results.get("zero3", {}).get("mfu")
    measured = {
        n: results[n]["tokens_per_s"] for n in FULL_FT_BACKENDS if "tokens_per_s" in results.get(n, {})
    }
    best = max(measured, key=measured.__getitem__) if measured else None
    out["best_full_ft"] = best
    out["best_full_ft_vs_plain"] = ratio(best, "plain")
    out["best_full_ft_mfu"] = results[best].get("mfu") if best else None
    judged = cuda and not tiny  # the goals are for the 1.1B model on one H100/H200
    out["goals"] = {
        key: {
            "goal": f">= {goal}",
            "value": out.get(key),
            "met": out[key] >= goal if judged and out.get(key) is not None else None,
        }
        for key, goal in GOALS.items()
    }
    return out


def table(report: dict[str, Any]) -> str:
    results, extra = report["results"], report["derived"]
    rows = [f"{'part':<14} {'tokens/s':>11} {'step s':>8} {'MFU':>7} {'peak GiB':>9} {'loss first→last':>17}"]
    for name in TRAINING_PARTS:
        part = results.get(name)
        if part is None:
            continue
        if "error" in part:
            rows.append(f"{name:<14} FAILED: {part['error']}")
            continue
        mfu = f"{part['mfu'] * 100:.1f}%" if part.get("mfu") is not None else "n/a"
        mem = f"{part['peak_alloc_gib']:.1f}" if part.get("peak_alloc_gib") is not None else "n/a"
        loss = f"{part['loss_first']}→{part['loss_last']}"
        rows.append(
            f"{name:<14} {part['tokens_per_s']:>11.0f} {part['step_s']:>8.3f} {mfu:>7} {mem:>9} {loss:>17}"
        )
    peak = results.get("peak", {})
    rows.append(f"matmul peak: {peak.get('peak_tflops', 'n/a')} TFLOP/s ({peak.get('dtype', '?')})")
    rows.append(
        "ratios: "
        + ", ".join(f"{key} {'n/a' if extra[key] is None else f'{extra[key]:.3f}'}" for key in RATIOS)
        + f"; best full fine-tuning backend: {extra['best_full_ft'] or 'n/a'}"
    )
    for key, goal in extra["goals"].items():
        value = goal["value"]
        shown = "n/a" if value is None else f"{value:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not judged"}[goal["met"]]
        rows.append(f"{key:<22} {shown:>7}  (goal {goal['goal']}: {verdict})")
    profiled = results.get("profile")
    if profiled and "error" in profiled:
        rows.append(f"profile: FAILED: {profiled['error']}")
    elif profiled:
        shares = sorted(profiled["categories"].items(), key=lambda item: -item[1]["share"])
        idle = profiled.get("device_idle_share")
        rows.append(
            f"profile ({profiled['backend']}, share of {profiled['basis']}, {profiled['recorded_steps']} steps): "
            + ", ".join(f"{name} {values['share'] * 100:.1f}%" for name, values in shares)
            + (f"; GPU idle {idle * 100:.1f}% of the steps" if idle is not None else "")
        )
        rows.append(f"profile trace: {profiled['trace']} ({profiled['trace_mib']} MiB)")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU logic check: tiny model, 2 steps")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps per part (after warm-up)")
    parser.add_argument(
        "--profile-backend",
        choices=("zero3", "fsdp2"),
        default="zero3",
        help="the backend the profile part runs",
    )
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--global-batch", type=int)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="on every side of every comparison"
    )
    parser.add_argument(
        "--part-timeout", type=float, default=240.0, help="seconds per part, start-up included"
    )
    parser.add_argument("--workdir", help="model, data and runs go here (default: a temporary folder)")
    parser.add_argument(
        "--out", help="results JSON (default: $OUT/gpu_check.json, else bench/gpu_check.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--verbose", action="store_true", help="stream every part's own output")
    parser.add_argument("--part", choices=("setup", *PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = TINY_SHAPE if args.tiny else GPU_SHAPE
    overrides = {
        "steps": args.steps,
        "warmup": args.warmup,
        "micro_batch": args.micro_batch,
        "global_batch": args.global_batch,
        "gradient_checkpointing": args.gradient_checkpointing or None,
    }
    args.shape = Shape(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
    if args.shape.warmup < 1 or args.shape.steps < 1 or args.shape.global_batch % args.shape.micro_batch:
        parser.error("--warmup and --steps must be >= 1 and --global-batch a multiple of --micro-batch")
    args.out_file = (
        Path(args.out)
        if args.out
        else Path(os.environ.get("OUT") or Path(__file__).parent) / "gpu_check.json"
    )
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--keep"]
    for flag in ("--part", "--workdir"):  # the orchestrator sets these itself
        while flag in args.passthrough:
            index = args.passthrough.index(flag)
            del args.passthrough[index : index + 2]
    return args


def main(argv: list[str] | None = None) -> int:
    global _SHAPE
    args = parse_args(argv)
    _SHAPE = args.shape
    if args.part:
        run_part(args.part, Path(args.workdir), args)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny for the CPU logic check", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown parts {unknown}; choose from {PARTS}", file=sys.stderr)
        return 2
    out_file = args.out_file
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="keeltune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0)
            if cuda
            else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "tiny": args.tiny,
        "shape": asdict(args.shape),
        "tokens_per_step": args.shape.tokens_per_step,
        "flops_formula": "6N + 12*L*h*s (full FT), 4N + 6*N_lora + 12*L*h*s (QLoRA); N = matmul params",
        "results": {},
    }
    print(f"work folder: {work}\nshape: {asdict(args.shape)}", flush=True)

    def save() -> None:
        report["derived"] = derived(report["results"], cuda, args.tiny)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=1))

    try:
        needs_data = any(p != "peak" for p in parts)
        if needs_data:
            report["results"]["setup"] = spawn("setup", work, args, args.part_timeout)
            save()
        for name in PARTS:
            if name not in parts:
                continue
            if needs_data and "error" in report["results"]["setup"] and name != "peak":
                report["results"][name] = {"error": "setup failed"}
                continue
            report["results"][name] = spawn(name, work, args, args.part_timeout)
            save()
    finally:
        save()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(report))
    print(f"\nresults: {out_file}")
    failed = [name for name, part in report["results"].items() if "error" in part]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
