"""What a backend will do, worked out without torch (the login node shows it): the DeepSpeed config.

The DeepSpeed config is always generated from the typed config, never written by hand.
"""

from __future__ import annotations

import json
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
