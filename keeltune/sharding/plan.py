"""What a backend will do, worked out without torch (the login node shows it): the DeepSpeed config.

The DeepSpeed config is always generated from the typed config, never written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from keeltune.config import Config, ConfigError


def model_hidden_size(model_path: str) -> int:
    """``hidden_size`` (or its other names) from a Hugging Face ``config.json``."""
    config_file = Path(model_path) / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.path: cannot read {config_file}: {err}") from None
    data = data.get("text_config", data)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(data.get(key), int):
            return data[key]
    raise ConfigError(f"model.path: {config_file} names no hidden_size; set the sharding.zero3 sizes by hand")


def deepspeed_config(config: Config, world_size: int, *, bf16: bool, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed ZeRO-3 config for ``world_size`` ranks; bucket sizes follow the model's hidden size."""
    training, zero = config.training, config.sharding.zero3
    square = hidden_size * hidden_size
    optimization: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": zero.reduce_bucket_size if zero.reduce_bucket_size is not None else square,
        "stage3_prefetch_bucket_size": (
            zero.prefetch_bucket_size if zero.prefetch_bucket_size is not None else int(0.9 * square)
        ),
        "stage3_param_persistence_threshold": (
            zero.param_persistence_threshold
            if zero.param_persistence_threshold is not None
            else 10 * hidden_size
            if world_size > 1
            else 10**15  # one rank has nothing to partition: keep parameters resident, skip gather/release
        ),
        "stage3_max_live_parameters": zero.max_live_parameters,
        "stage3_max_reuse_distance": zero.max_live_parameters,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    if zero.offload_optimizer == "cpu":
        optimization["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_params == "cpu":
        optimization["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": training.global_batch_size,
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation(world_size),
        "gradient_clipping": training.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": optimization,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def model_shape(model_path: str) -> dict[str, int]:
    """Parameter count (from the safetensors headers: no weights read) and sizes from ``config.json``."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [folder / "model.safetensors"]
    )
    params = 0
    for path in files:
        try:
            with open(path, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path: cannot read the safetensors header of {path}: {err}") from None
        header.pop("__metadata__", None)
        params += sum(math.prod(entry["shape"]) for entry in header.values())
    data = json.loads((folder / "config.json").read_text())
    data = data.get("text_config", data)
    return {
        "params": params,
        "hidden": model_hidden_size(model_path),
        "layers": int(data.get("num_hidden_layers") or data.get("n_layer") or 1),
        "vocab": int(data.get("vocab_size") or 0),
    }


def estimate_gpu_memory(config: Config, world_size: int) -> dict[str, float]:
    """A rough per-GPU memory estimate in GiB, by part, for the chosen backend (bf16 compute assumed on GPU).

    States: ddp 16 B/param (fp32 weights, gradients, AdamW); zero3 (2 + 2 + 12) B/param / ranks, the 12 on CPU
    with optimizer offload, plus two layers gathered; qlora 0.55 B/param (NF4 with double quantization) plus
    16 B per LoRA parameter. Activations per micro-batch: 34 B per token x hidden x layer (2 with activation
    checkpointing, plus one layer's 34), and fp32 logits with their gradient (8 B per token x vocab).
    Regularizers: KL keeps the base (ddp an fp32 copy, zero3 bf16 / ranks, qlora nothing) and its fp32 logits
    (4 B per token x vocab); L2-SP and EWC keep fp32 pretrained weights (ddp: the KL copy when there is one),
    EWC an fp32 Fisher (both / ranks under zero3)."""
    shape = model_shape(config.model.path)
    params, hidden, layers, vocab = shape["params"], shape["hidden"], shape["layers"], shape["vocab"]
    backend, zero = config.sharding.backend, config.sharding.zero3
    if backend == "zero3":
        states = (4 + (0 if zero.offload_optimizer == "cpu" else 12)) * params / world_size
        states += 2 * 2 * params / layers  # two layers' bf16 parameters gathered at a time
    elif backend == "qlora":
        lora = 2 * config.sharding.qlora.rank * hidden * 7 * layers  # ~7 adapted matrices per layer
        states = 0.55 * params + 16 * lora
    else:
        states = 16.0 * params
    tokens = config.training.micro_batch_size * config.data.seq_len
    reg = config.regularization
    kl, anchored, ewc = reg.kl.weight > 0, reg.l2sp.weight > 0 or reg.ewc.weight > 0, reg.ewc.weight > 0
    if backend == "zero3":  # partitioned: a bf16 base, fp32 anchors and Fisher, each / ranks
        penalties = (2 * kl + 4 * anchored + 4 * ewc) * params / world_size
    elif backend == "ddp":  # an fp32 base copy, whose weights are also the anchors
        penalties = (4 * (kl or anchored) + 4 * ewc) * params
    else:  # qlora: the base is the model with adapters off; anchors and changes are the adapters'
        penalties = 0.0
    penalties += 4.0 * tokens * vocab if reg.kl.weight > 0 else 0.0
    per_layer = 2 if config.model.gradient_checkpointing else 34
    activations = tokens * hidden * (per_layer * layers + (34 if config.model.gradient_checkpointing else 0))
    logits = 8.0 * tokens * vocab
    gib = 1024**3
    parts = {
        "model and optimizer states": states / gib,
        "activations": activations / gib,
        "logits": logits / gib,
    }
    if penalties:
        parts["regularizers (base copy, anchors, Fisher, reference logits)"] = penalties / gib
    parts["total"] = sum(parts.values())
    return parts
