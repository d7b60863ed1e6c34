"""What a backend will do, worked out without torch (the login node shows it): the DeepSpeed config and the
memory estimate per GPU.

The DeepSpeed config is always generated from the typed config, never written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keeltune.config.errors import ConfigError

if TYPE_CHECKING:
    from keeltune.config.schema import Config


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


def weight_shapes(model_path: str) -> dict[str, list[int]]:
    """Every weight's shape from a Hugging Face folder's safetensors headers (no weights read)."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [folder / "model.safetensors"]
    )
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with open(path, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path: cannot read the safetensors header of {path}: {err}") from None
        header.pop("__metadata__", None)
        shapes.update({name: entry["shape"] for name, entry in header.items()})
    return shapes


def block_matrix_shapes(shapes: dict[str, list[int]]) -> list[list[int]]:
    """The transformer blocks' matrices (what a 4-bit base quantizes): 2-D weights under ``.layers.``."""
    return [shape for name, shape in shapes.items() if ".layers." in name and len(shape) == 2]


def model_shape(model_path: str) -> dict[str, int]:
    """Parameter count (from the safetensors headers: no weights read) and sizes from ``config.json``."""
    folder = Path(model_path)
    shapes = weight_shapes(model_path)
    params = sum(math.prod(shape) for shape in shapes.values())
    block_matrices = sum(math.prod(shape) for shape in block_matrix_shapes(shapes))
    data = json.loads((folder / "config.json").read_text())
    data = data.get("text_config", data)
    return {
        "params": params,
        "hidden": model_hidden_size(model_path),
        "layers": int(data.get("num_hidden_layers") or data.get("n_layer") or 1),
        "vocab": int(data.get("vocab_size") or 0),
        "tied": int(bool(data.get("tie_word_embeddings", False))),
        "block_matrices": block_matrices,
    }


def estimate_gpu_memory(config: Config, world_size: int) -> dict[str, float]:
    """A rough per-GPU memory estimate in GiB, by part, for the chosen backend (bf16 compute assumed on GPU).

    States (each backend's registry entry): ddp 16 B/param (fp32 weights, gradients, AdamW); zero3
    (2 + 2 + 12) B/param / ranks, the 12 on CPU with optimizer offload, plus two layers gathered; fsdp2
    16 B/param / ranks, plus the root and two blocks gathered in the compute dtype; qlora 0.55 B/param (NF4
    with double quantization) plus 16 B per LoRA parameter. Activations per micro-batch: 34 B per token x
    hidden x layer (2 with activation checkpointing, plus one layer's 34), and fp32 logits with their gradient
    (8 B per token x vocab).
    Regularizers: KL keeps the base (ddp an fp32 copy, zero3 bf16 / ranks, qlora nothing) and its fp32 logits
    (4 B per token x vocab); L2-SP and EWC keep fp32 pretrained weights (ddp: the KL copy when there is one),
    EWC an fp32 Fisher (both / ranks under zero3)."""
    from keeltune.config.backends import backend_spec  # the registry reads this module: imported here

    shape = model_shape(config.model.path)
    hidden, layers, vocab = shape["hidden"], shape["layers"], shape["vocab"]
    spec = backend_spec(config)
    states = spec.states_bytes(config, shape, world_size)
    tokens = config.training.micro_batch_size * config.data.seq_len
    penalties = spec.regularizer_bytes(config, shape, world_size)
    penalties += 4.0 * tokens * vocab if config.regularization.kl.weight > 0 else 0.0
    per_layer = 2 if config.model.gradient_checkpointing else 34
    activations = tokens * hidden * (per_layer * layers + (34 if config.model.gradient_checkpointing else 0))
    logits = 8.0 * tokens * vocab
    gib = 1024**3
    parts = {"model and optimizer states": states / gib}
    if spec.gathered_bytes is not None:
        parts["parameters gathered for compute"] = spec.gathered_bytes(config, shape, world_size) / gib
    parts |= {
        "activations": activations / gib,
        "logits": logits / gib,
    }
    if penalties:
        parts["regularizers (base copy, anchors, Fisher, reference logits)"] = penalties / gib
    parts["total"] = sum(parts.values())
    return parts


def deepspeed_summary(config: Config, nproc: int) -> list[str]:
    """The DeepSpeed JSON keeltune generates for ``nproc`` ranks, as comment lines (``keeltune config``)."""
    try:
        hidden = model_hidden_size(config.model.path)
    except ConfigError as err:
        return [f"# DeepSpeed config: not shown, its sizes come from the model's config.json ({err})"]
    bf16 = config.training.precision in ("bf16", "auto")
    generated = deepspeed_config(config, nproc, bf16=bf16, hidden_size=hidden)
    note = (
        " (precision auto: bf16 on GPUs with bf16, fp32 elsewhere)"
        if config.training.precision == "auto"
        else ""
    )
    lines = [f"# DeepSpeed config generated for {nproc} rank(s){note}:"]
    return lines + [f"#   {line}" for line in json.dumps(generated, indent=2).splitlines()]
