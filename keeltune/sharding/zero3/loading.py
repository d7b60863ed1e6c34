"""The partitioned model: built under ``deepspeed.zero.Init``, its weights streamed in one module at a time, so no
rank ever holds the whole model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from keeltune.config import Config, ConfigError
from keeltune.distributed import ParallelEnv
from keeltune.sharding.model import causal_lm_config
from keeltune.sharding.tensor_files import model_tensor_files


def load_partitioned_model(
    config: Config, ds_config: dict[str, Any], parallel: ParallelEnv
) -> torch.nn.Module:
    """Build the model under ``zero.Init`` and stream its weights in, one module at a time.

    Rank 0 reads each tensor with a ranged read (no mmap) and DeepSpeed scatters it: a rank holds its
    partition plus, briefly, one module's full parameters."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_config = causal_lm_config(config.model.path, dropout=config.regularization.dropout)
    # resolved outside zero.Init: importing modeling code under its tensor patches fails
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    # No random init: every weight is read from the files below (and HF's init fails on partitioned params).
    # No dtype argument either: DeepSpeed 0.19 turns an explicit float32 into bf16 on CPU; the config's bf16
    # flag gives the right one.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = model_class(model_config)
    model.tie_weights()  # skipped with the init above; tied parameters then load (and partition) once
    files = model_tensor_files(Path(config.model.path))
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in files]
    if missing:  # every rank sees the same files, so every rank stops here together
        raise ConfigError(
            f"model.path: {config.model.path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    loaded: set[int] = set()
    for prefix, module in model.named_modules():
        params = [
            (f"{prefix}.{name}" if prefix else name, param)
            for name, param in module.named_parameters(recurse=False)
            if id(param) not in loaded
        ]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([param for _, param in params], modifier_rank=0):
            if parallel.is_main:
                for name, param in params:
                    param.data.copy_(files[name].tensor(name).reshape(param.shape))
        loaded.update(id(param) for _, param in params)
    for name, buffer in model.named_buffers():
        if name in files:
            buffer.copy_(files[name].tensor(name))
    return model
