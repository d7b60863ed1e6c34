"""GPU check: keeltune ZeRO-3 and QLoRA on a ~1.1B Llama (random init, seq 2048) against plain baselines.

Parts, in order of importance, each in its own subprocess (one failure or a hang loses only that part; every
result is printed and written to the JSON as soon as it is measured):

1. ``peak``: the card's measured bf16 matmul peak (torch.matmul, 8192 x 8192).
2. ``plain``: a plain PyTorch loop: fp32 weights, bf16 autocast, fused AdamW, grad clip 1.0, same batches.
3. ``zero3``: keeltune's real product path: ``Trainer.train_one_step`` with ``sharding.backend: zero3``
   (DeepSpeed ZeRO-3, bf16), reading the packed shards keeltune prepared from a jsonl of random words.
4. ``qlora``: the same with ``sharding.backend: qlora`` (nf4 + double quant, LoRA r16 all-linear).
5. ``hf_qlora``: the same QLoRA setup through HF ``Trainer`` + peft, fed the same packed samples.

Every sample is a full packed sequence (no padding), so tokens = steps x global batch x seq_len on every side.
Timed steps exclude warm-up steps; the clock runs over whole optimizer steps, data loading included.

FLOPs per token (model FLOPs, recomputation from gradient checkpointing not counted):
  full fine-tuning: 6*N + 12*L*h*s, QLoRA: 4*N + 6*N_lora + 12*L*h*s (frozen base: forward + input grads),
  N = parameters in matmuls (every transformer linear + lm_head; the embedding lookup is not a matmul),
  attention 12*L*h*s per token = QK^T and AV forward+backward counted over the full s x s square (PaLM's
  convention; a causal kernel does about half: ``mfu_causal`` in the JSON uses 6*L*h*s).
  MFU = tokens/s * FLOPs per token / measured bf16 matmul peak.

    python bench/gpu_check.py [--parts peak,plain,zero3,qlora,hf_qlora] [--steps 10] [--tiny]

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
PARTS = ("peak", "plain", "zero3", "qlora", "hf_qlora")
RESULT_PREFIX = "GPU_CHECK_RESULT "
GOALS = {"zero3_vs_plain": 0.9, "zero3_mfu": 0.45, "qlora_vs_hf": 1.3}


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


def keeltune_config(work: Path, shape: Shape, backend: str) -> Any:
    """The keeltune config of a check part: one jsonl source, prepared once into a shared folder."""
    from keeltune.config import config_from_dict

    cuda = device().type == "cuda"
    return config_from_dict(
        {
            "run": {"name": backend, "root": str(work / "runs")},
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
            "sharding": {"backend": backend},
            "eval": {"at_start": False},
            "logging": {"every_steps": 1, "wandb": {"mode": "disabled"}},
        }
    )


def packed_samples(work: Path, shape: Shape) -> Any:
    """keeltune's prepared packed dataset (the same samples the keeltune parts train on)."""
    from keeltune.distributed import ParallelEnv
    from keeltune.sharding.model import load_tokenizer
    from keeltune.training.build import build_datasets

    config = keeltune_config(work, shape, "ddp")
    tokenizer = load_tokenizer(config.model.tokenizer_path)
    train, _ = build_datasets(config, tokenizer, ParallelEnv())
    needed = (shape.warmup + shape.steps) * shape.global_batch
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
    needed_tokens = int((shape.warmup + shape.steps + 2) * shape.global_batch * (shape.seq_len + 1) * 1.2)
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


def _keeltune(work: Path, shape: Shape, backend: str) -> dict[str, Any]:
    """keeltune's Trainer, one ``train_one_step`` at a time (what ``fit`` runs, without eval/checkpoints)."""
    from keeltune.distributed import ParallelEnv
    from keeltune.launcher.run_dir import prepare_run_dir
    from keeltune.run_folder import METRICS_FILE
    from keeltune.training.trainer import Trainer

    config = keeltune_config(work, shape, backend)
    prepare_run_dir(config)
    started = time.perf_counter()
    trainer = Trainer(config, ParallelEnv.from_environment())
    build_s = time.perf_counter() - started
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
        "path": f"keeltune Trainer.train_one_step, sharding.backend={backend}",
    }


def part_zero3(work: Path, shape: Shape) -> dict[str, Any]:
    return _keeltune(work, shape, "zero3")


def part_qlora(work: Path, shape: Shape) -> dict[str, Any]:
    return _keeltune(work, shape, "qlora")


def part_hf_qlora(work: Path, shape: Shape) -> dict[str, Any]:
    """HF Trainer + peft, the QLoRA settings of keeltune's defaults, the same packed samples (input = label)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from keeltune.config import QLoraConfig

    dev = device()
    cuda = dev.type == "cuda"
    q = QLoraConfig()  # keeltune's defaults, which the qlora part runs with
    dataset = packed_samples(work, shape)
    count = (shape.warmup + shape.steps) * shape.global_batch
    ids, _ = dataset.get(np.arange(count))
    rows = [{"input_ids": torch.from_numpy(row[:-1]), "labels": torch.from_numpy(row[:-1])} for row in ids]

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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    build_s = time.perf_counter() - started

    ends: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(work / "hf_qlora"),
        max_steps=shape.warmup + shape.steps,
        per_device_train_batch_size=shape.micro_batch,
        gradient_accumulation_steps=shape.global_batch // shape.micro_batch,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,  # one loss sync per step, as keeltune's loop has
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator, callbacks=[Clock()]
    )
    trainer.train()
    if len(ends) != shape.warmup + shape.steps:
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {shape.warmup + shape.steps}")
    return {
        **timing(shape, ends[-1] - ends[shape.warmup - 1]),
        **memory(),
        "flops_per_token": shape.flops_per_token(trainable),
        "trainable_params": trainable,
        "build_s": round(build_s, 1),
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(losses[-1], 4) if losses else None,
        "path": "transformers Trainer + peft (prepare_model_for_kbit_training, get_peft_model)",
    }


# --------------------------------------------------------------------------- orchestration


def run_part(name: str, work: Path, shape: Shape) -> None:
    """Inside the subprocess: run one part and print its result on one line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    result = globals()[f"part_{name}"](work, shape)
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
        return {"error": f"exit status {process.returncode}", "log_tail": tail[-15:]}
    print(
        f"  {name}: {json.dumps(result)}  ({time.perf_counter() - started:.0f} s with start-up)", flush=True
    )
    return result


def derived(results: dict[str, Any], cuda: bool, tiny: bool) -> dict[str, Any]:
    """MFU per training part, and the ratios the issue sets goals for."""
    peak = results.get("peak", {}).get("peak_tflops")
    out: dict[str, Any] = {}
    for name in ("plain", "zero3", "qlora", "hf_qlora"):
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
    for key, (a, b) in {"zero3_vs_plain": ("zero3", "plain"), "qlora_vs_hf": ("qlora", "hf_qlora")}.items():
        x, y = results.get(a, {}).get("tokens_per_s"), results.get(b, {}).get("tokens_per_s")
        out[key] = round(x / y, 3) if x and y else None
    out["zero3_mfu"] = results.get("zero3", {}).get("mfu")
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
    rows = [f"{'part':<10} {'tokens/s':>11} {'step s':>8} {'MFU':>7} {'peak GiB':>9} {'loss first→last':>17}"]
    for name in ("plain", "zero3", "qlora", "hf_qlora"):
        part = report["results"].get(name)
        if part is None:
            continue
        if "error" in part:
            rows.append(f"{name:<10} FAILED: {part['error']}")
            continue
        mfu = f"{part['mfu'] * 100:.1f}%" if part.get("mfu") is not None else "n/a"
        mem = f"{part['peak_alloc_gib']:.1f}" if part.get("peak_alloc_gib") is not None else "n/a"
        loss = f"{part['loss_first']}→{part['loss_last']}"
        rows.append(
            f"{name:<10} {part['tokens_per_s']:>11.0f} {part['step_s']:>8.3f} {mfu:>7} {mem:>9} {loss:>17}"
        )
    peak = report["results"].get("peak", {})
    rows.append(f"matmul peak: {peak.get('peak_tflops', 'n/a')} TFLOP/s ({peak.get('dtype', '?')})")
    for key, goal in report["derived"]["goals"].items():
        value = goal["value"]
        shown = "n/a" if value is None else f"{value:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not judged"}[goal["met"]]
        rows.append(f"{key:<15} {shown:>7}  (goal {goal['goal']}: {verdict})")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU logic check: tiny model, 2 steps")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps per part (after warm-up)")
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
        run_part(args.part, Path(args.workdir), args.shape)
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
    out_file = (
        Path(args.out)
        if args.out
        else Path(os.environ.get("OUT") or Path(__file__).parent) / "gpu_check.json"
    )
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
