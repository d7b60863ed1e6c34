"""Load Hugging Face causal LMs and tokenizers from local folders (safetensors only, no hub)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from keeltune.run_folder import VOCABULARY_FILE


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; keeltune needs one to separate documents")
    return tokenizer


def causal_lm_config(path: str, *, dropout: float | None = None) -> Any:
    """The model's config; ``dropout`` overrides its attention/hidden dropout (whatever this architecture calls it)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path, local_files_only=True)
    if dropout is not None:
        for key in (
            "attention_dropout",
            "hidden_dropout",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "dropout",
        ):
            if hasattr(model_config, key):
                setattr(model_config, key, dropout)
    return model_config


def load_causal_lm(
    path: str,
    *,
    dropout: float | None = None,
    dtype: torch.dtype | str = torch.float32,
    quantization: Any | None = None,
    device: torch.device | None = None,
) -> Any:
    """A model from a local folder, weights read as safetensors; ``dropout`` overrides the model's own.

    With ``quantization`` (a transformers quantization config) the weights are quantized while loading, straight
    onto ``device`` (default CPU)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    placement = {}
    if quantization is not None:
        placement = {"quantization_config": quantization, "device_map": {"": str(device or "cpu")}}
    return AutoModelForCausalLM.from_pretrained(
        path,
        config=causal_lm_config(path, dropout=dropout),
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        **placement,
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where asked, or on ``auto`` where the device computes bf16 natively (CUDA); None: fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases, norms and other vectors."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the real shape aside
            (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute layer activations in backward (non-reentrant), whatever this transformers version calls it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@torch.no_grad()
def sample_sequences(
    generate: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    pad_token_id: int,
) -> torch.Tensor:
    """Ancestral sampling (no top-k or top-p cut) of continuations of ``input_ids`` through ``generate`` (a
    backend's, or a transformers model's); rows that reach EOS are padded."""
    return generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,  # no empty documents: EOS only after a first token
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def add_neftune(model: torch.nn.Module, alpha: float) -> None:
    """NEFTune: uniform noise in [-1, 1] * alpha / sqrt(seq_len * hidden) on the input embeddings, while the
    embedding module is in training mode only (never at eval, never in reference or Fisher passes)."""
    if alpha <= 0:
        return

    def noisy(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-1.0, 1.0) * scale

    model.get_input_embeddings().register_forward_hook(noisy)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every parameter's optimizer state back to a new optimizer's (moments zero, step 0), in place: the next
    step is a fresh optimizer's, and tensors DeepSpeed points at stay the same objects."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif key == "step":
                state[key] = 0


@torch.no_grad()
def extend_embeddings(model: torch.nn.Module, first_id: int, pieces: list[list[int]]) -> None:
    """Rows for new token ids ``first_id, first_id + 1, ...`` in the input embeddings and the output layer (one
    matrix when tied), each the mean of its ``pieces``' rows; the old rows stay as they were. A model with
    spare rows beyond its tokenizer (a padded vocabulary) uses them before growing."""
    rows = model.get_input_embeddings().weight.shape[0]
    needed = first_id + len(pieces)
    if needed > rows:
        model.resize_token_embeddings(needed, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for matrix in matrices:
        for offset, ids in enumerate(pieces):
            matrix[first_id + offset] = matrix[ids].float().mean(0).to(matrix.dtype)


def new_token_ids(model_path: str) -> list[int]:
    """The ids a domain vocabulary added to the base at ``model_path`` (the run's extended base); [] for any
    other model."""
    file = Path(model_path) / VOCABULARY_FILE
    return [int(t["id"]) for t in json.loads(file.read_text())["tokens"]] if file.is_file() else []
