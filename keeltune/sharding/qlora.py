"""QLoRA: a frozen 4-bit base (bitsandbytes) with LoRA adapters (peft), data parallel over ranks.

Every rank holds the whole 4-bit base (about 0.3x its bf16 size); only the adapters train, so only their
gradients are all-reduced and only they (with their optimizer state) go into checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from keeltune.config import Config, QLoraConfig
from keeltune.distributed import ParallelEnv
from keeltune.sharding.ddp import ReplicaBackend
from keeltune.sharding.model import add_neftune, load_causal_lm, new_token_ids

# bitsandbytes warns at import that an optional CPU kernel package is missing; its fallback is fine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
MAX_SHARD_BYTES = 2 * 1024**3


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the 4-bit layers compute in: ``auto`` is bf16 on a CUDA device with bf16, else fp32."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def keep_training_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for inference on CPUs with avx512_bf16.

    Otherwise any eval-mode forward under no_grad repacks them, and later training goes through a kernel without
    autograd: gradients through the 4-bit layers are silently dropped."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_lora_model(config: Config, device: torch.device) -> Any:
    """The 4-bit base from ``model.path`` with fresh LoRA adapters; only ``lora_`` parameters train."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    cfg = config.sharding.qlora
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg.compute_dtype, device),
    )
    base = load_causal_lm(
        config.model.path, dropout=config.regularization.dropout, quantization=quantization, device=device
    )
    keep_training_layout(base)
    base = prepare_model_for_kbit_training(
        base,
        use_gradient_checkpointing=config.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = get_peft_model(base, lora_config(cfg, _new_token_rows(base, new_token_ids(config.model.path))))
    for name, param in model.named_parameters():
        param.requires_grad_(any(part in name for part in TRAINED_PARTS))
    return model


TRAINED_PARTS = ("lora_", "trainable_tokens_delta")  # the adapters, and a domain vocabulary's new rows


def _new_token_rows(model: torch.nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """peft's trainable token rows for a domain vocabulary's ``ids``: in the input embeddings, and in the output
    layer unless it is tied to them (peft then trains the shared rows once)."""
    if not ids:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    rows = {names[id(model.get_input_embeddings())].rsplit(".", 1)[-1]: ids}
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        rows[names[id(output)].rsplit(".", 1)[-1]] = ids
    return rows


def lora_config(cfg: QLoraConfig, token_rows: dict[str, list[int]] | None = None) -> Any:
    from peft import LoraConfig

    targets: str | list[str] = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        trainable_token_indices=token_rows or None,
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_file(model: torch.nn.Module, path: Path) -> None:
    """Copy the adapter weights ``save`` wrote into ``model``; refuse a file whose names or shapes differ."""
    saved = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    misshaped = sorted(n for n in params.keys() & saved.keys() if params[n].shape != saved[n].shape)
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{path}: adapter weights do not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"other shape {misshaped[:5]}); was it written with other sharding.qlora settings (rank, "
            "target_modules) or another base model?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def _linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as a fresh fp32 tensor, dequantized when it is 4-bit."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if hasattr(layer.weight, "get_original_weight"):  # torchao's NF4 (qlora with shard_base)
        return layer.weight.get_original_weight().float()
    return layer.weight.detach().float().clone()


def _merged_tensors(
    module: torch.nn.Module, prefix: str = "", tied: set[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors under Hugging Face's names, 4-bit weights dequantized with the LoRA deltas added, and
    a domain vocabulary's trained rows in their matrices (a matrix tied to one written before: not again)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    tied = set() if tied is None else tied
    if isinstance(module, TrainableTokensWrapper):
        rows = module.token_adapter
        weight = rows.get_base_layer().weight
        if id(weight) not in tied:
            tied.add(id(weight))
            yield prefix + "weight", rows.get_merged_weights(rows.active_adapters).detach().float()
        return
    if isinstance(module, (LoraLayer, bnb.nn.Linear4bit)):
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        weight = _linear_weight(base)
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).float()
        yield prefix + "weight", weight
        if base.bias is not None:
            yield prefix + "bias", base.bias.detach()
        return
    yield from ((prefix + name, p.detach()) for name, p in module.named_parameters(recurse=False))
    for name, buffer in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield prefix + name, buffer
    for name, child in module.named_children():
        yield from _merged_tensors(child, f"{prefix}{name}.", tied)


def _tied_duplicates(module: torch.nn.Module) -> set[str]:
    """Names under which an already named parameter appears again (tied weights): stored once, as transformers
    does."""
    first: set[int] = set()
    duplicates = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            duplicates.add(name)
        first.add(id(param))
    return duplicates


def _shards(tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive groups of at most ``max_bytes`` (a bigger tensor makes a group of its own)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        if shard and size + tensor.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    yield shard


def write_merged(
    model: Any, folder: Path, base_path: str, dtype: torch.dtype, *, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """A plain Hugging Face folder (no quantization_config): the base dequantized to ``dtype`` with the adapters
    merged in. Layers are dequantized one at a time and written in safetensors shards as these fill (with
    transformers' index when there are several), so the peak is the 4-bit model plus one shard."""
    from transformers import AutoConfig

    skip = _tied_duplicates(model.get_base_model())
    tensors = (
        (name, tensor.to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous())
        for name, tensor in _merged_tensors(model.get_base_model())
        if name not in skip
    )
    folder.mkdir(parents=True, exist_ok=True)
    written: list[list[str]] = []
    total = 0
    for shard in _shards(tensors, max_shard_bytes):
        save_file(shard, str(folder / f".shard-{len(written)}"), metadata={"format": "pt"})
        written.append(list(shard))
        total += sum(t.nbytes for t in shard.values())
    if len(written) == 1:
        os.replace(folder / ".shard-0", folder / "model.safetensors")
    else:
        weight_map = {}
        for index, names in enumerate(written):
            file = f"model-{index + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(folder / f".shard-{index}", folder / file)
            weight_map.update(dict.fromkeys(names, file))
        index_file = folder / "model.safetensors.index.json"
        index_file.write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    model_config = AutoConfig.from_pretrained(base_path, local_files_only=True)
    model_config.dtype = dtype
    model_config.save_pretrained(folder)


def write_adapter(model: Any, folder: Path) -> None:
    """The adapter as a peft folder (adapter_config.json + safetensors), loadable onto the base model."""
    model.save_pretrained(folder, safe_serialization=True)


class QLoraBackend(ReplicaBackend):
    """4-bit frozen base + LoRA on every rank; DDP all-reduces the adapters' gradients."""

    def __init__(self, config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> None:
        """``keep_reference`` costs nothing here: the reference is the base with the adapters disabled."""
        self.base_path = config.model.path
        self.compute_dtype = compute_dtype(config.sharding.qlora.compute_dtype, parallel.device)
        self.model = build_lora_model(config, parallel.device)
        add_neftune(self.model, config.regularization.neftune_alpha)
        self._replicate(config, parallel)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The 4-bit base alone (adapters disabled, eval mode): the pretrained model, with no extra weights."""
        mode = self.model.training
        self.model.train(False)
        try:
            with self.model.disable_adapter(), self._autocast():
                return self.model(input_ids=input_ids, use_cache=False).logits.float()
        finally:
            self.model.train(mode)

    def save(self, folder: Path) -> None:
        """Adapter weights and optimizer state only: the base is read again from ``model.path``."""
        if self.parallel.is_main:
            save_file(trainable_state(self.model), str(folder / ADAPTER_FILE))
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        load_adapter_file(self.model, folder / ADAPTER_FILE)
        state = torch.load(folder / OPTIMIZER_FILE, map_location=self.parallel.device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def export(self, folder: Path) -> None:
        """The merged model in ``folder`` and the adapter in ``folder / "adapter"``.

        Merged means dequantized: fp32, or bf16 when the 4-bit layers compute in bf16. Merging into 4-bit
        weights would re-quantize them and round away much of the small LoRA deltas; a plain folder also loads
        anywhere, without bitsandbytes. Who wants the 4-bit base takes the adapter folder."""
        if self.parallel.is_main:
            write_merged(self.model, folder, self.base_path, self.compute_dtype)
            write_adapter(self.model, folder / ADAPTER_DIR)


def build(config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> Any:
    if config.sharding.qlora.shard_base:
        from keeltune.sharding.qlora_sharded import ShardedQLoraBackend

        return ShardedQLoraBackend(config, parallel, keep_reference=keep_reference)
    return QLoraBackend(config, parallel, keep_reference=keep_reference)


def export_checkpoint(config: Config, checkpoint: Path, out: Path, *, merge: bool = False) -> list[Path]:
    """A checkpoint's adapter as a peft folder in ``out``, and with ``merge`` the merged model in
    ``out / "merged"``; one process, no process group. Returns the folders written."""
    adapter_file = checkpoint / ADAPTER_FILE
    if not adapter_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {ADAPTER_FILE} (is this a checkpoint of a qlora run?)")
    if config.sharding.qlora.shard_base:
        from keeltune.sharding.qlora_sharded import export_adapters

        export_adapters(config, adapter_file, out, merged_into=out / MERGED_DIR if merge else None)
        return [out, out / MERGED_DIR] if merge else [out]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_lora_model(config, device)
    load_adapter_file(model, adapter_file)
    write_adapter(model, out)
    if not merge:
        return [out]
    dtype = compute_dtype(config.sharding.qlora.compute_dtype, device)
    write_merged(model, out / MERGED_DIR, config.model.path, dtype)
    return [out, out / MERGED_DIR]
