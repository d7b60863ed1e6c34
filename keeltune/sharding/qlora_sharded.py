"""QLoRA on a sharded 4-bit base (``sharding.qlora.shard_base: true``): torchao's NF4 weights with peft LoRA
adapters under FSDP2, so each rank holds 1/N of the 4-bit base and of the adapters.

torchao's ``NF4Tensor`` implements FSDP2's all-gather hooks (bitsandbytes' 4-bit parameters lose their
quantization state under ``fully_shard``). The model is built on the meta device, sharded, and every rank reads
and quantizes only its own rows of each weight; with the global mean of the block scales (one all-gather) that is
bit-identical to quantizing the whole weight and cutting it, so any number of ranks trains the same base.
Checkpoints hold the adapters only: the whole adapter file (as the ``qlora`` backend writes it, which
``keeltune export`` reads) and the sharded optimizer state as a distributed checkpoint.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.tensor import DTensor, distribute_tensor

from keeltune.config import Config, ConfigError
from keeltune.config.backends import NF4_GROUP, check_shardable
from keeltune.distributed import ParallelEnv
from keeltune.sharding.fsdp2 import (
    Fsdp2Backend,
    _computed_buffers,
    _meta_model,
    _shard,
    _whole,
    local_rows,
    resharded,
)
from keeltune.sharding.model import enable_activation_checkpointing
from keeltune.sharding.qlora import ADAPTER_DIR, ADAPTER_FILE, compute_dtype, lora_config
from keeltune.sharding.tensor_files import large_allocations_returned, model_tensor_files

BLOCK, SCALER_BLOCK = 64, 256  # NF4: one scale per 64 weights, the scales int8 in groups of 256


def _block_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers of the transformer blocks: the ones whose weights become 4-bit."""
    from keeltune.sharding.fsdp2 import _layers

    return [m for block in _layers(model) for m in block.modules() if isinstance(m, torch.nn.Linear)]


def _nf4_placeholders(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Each transformer block's linear weights as NF4 on the meta device (filled in after sharding)."""
    from torchao.quantization import to_nf4

    for module in _block_linears(model):
        module.weight = torch.nn.Parameter(to_nf4(module.weight.to(dtype)), requires_grad=False)


def build_nf4_lora_model(
    config: Config, parallel: ParallelEnv, mesh: Any | None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The NF4 base, quantized from ``dtype`` rows (default: the compute dtype on this rank's device), with
    fresh LoRA adapters (peft), sharded over ``mesh`` (None: whole, on one process)."""
    from peft import get_peft_model

    device = parallel.device
    dtype = dtype or compute_dtype(config.sharding.qlora.compute_dtype, device)
    base = _meta_model(config)
    buffers = _computed_buffers(base, base.config)
    check_shardable(
        {tuple(m.weight.shape) for m in _block_linears(base)}, mesh.size() if mesh is not None else 1
    )
    base.requires_grad_(False)
    with torch.device("meta"):
        _nf4_placeholders(base, dtype)
        model = get_peft_model(base, lora_config(config.sharding.qlora))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    if mesh is not None and mesh.size() > 1:  # one rank: nothing to shard (FSDP2 cannot gather NF4 from one)
        _shard(model, mesh, config, parallel, cast=False)
    model.to_empty(device=device)
    with torch.no_grad(), large_allocations_returned():
        _load_rows(model, config, device, dtype)
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name.removeprefix("base_model.model.")])
        _init_adapters(model, config.training.seed)
    return model


def _file_name(name: str) -> str:
    """A parameter's name in the base's files (peft wraps the model and each adapted layer)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _load_rows(model: torch.nn.Module, config: Config, device: torch.device, dtype: torch.dtype) -> None:
    from torchao.quantization import NF4Tensor, to_nf4

    files = model_tensor_files(Path(config.model.path))
    for name, param in list(model.named_parameters()):
        if "lora_" in name:
            continue
        key = _file_name(name)
        if key not in files:
            raise ConfigError(f"model.path: {config.model.path} lacks the weight {key}")
        sharded = isinstance(param, DTensor)
        local = param._local_tensor if sharded else param.data  # to_local() of NF4 makes a new tensor
        first, count = local_rows(param) if sharded else (0, param.shape[0])
        row = math.prod(param.shape[1:])
        rows = files[key].read(key, first * row, count * row).reshape(count, *param.shape[1:]).to(device)
        if isinstance(local, NF4Tensor) and not sharded:  # the whole weight: torchao quantizes it as usual
            owner, attribute = name.rsplit(".", 1)
            quantized = torch.nn.Parameter(to_nf4(rows.to(dtype), BLOCK, SCALER_BLOCK), requires_grad=False)
            setattr(model.get_submodule(owner), attribute, quantized)
        elif isinstance(local, NF4Tensor):
            _quantize_into(local, rows.to(dtype))
        else:
            local.copy_(rows.to(local.dtype))


def _quantize_into(local: Any, rows: torch.Tensor) -> None:
    """``rows`` quantized as they would be within the whole weight: the block scales' mean taken over all
    ranks' rows (every rank holds the same number)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import get_block_absmax

    scales = get_block_absmax(rows.flatten(), BLOCK)
    if dist.get_world_size() > 1:
        parts = [torch.empty_like(scales) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, scales)
        scales = torch.cat(parts)
    quantized = _nf4_rows(rows, scales.mean())
    for part in ("quantized_data", "quantized_scalers", "quantization_factor"):
        getattr(local, part).copy_(getattr(quantized, part))
    # to_empty materialises only the three sharded inner tensors; these two stay on the meta device
    local.scaler_mean, local.nf4 = quantized.scaler_mean, quantized.nf4


def _nf4_rows(rows: torch.Tensor, scaler_mean: torch.Tensor) -> Any:
    """torchao's NF4 of ``rows`` with the block scales centred on ``scaler_mean`` (the whole weight's)."""
    from torchao.quantization import NF4Tensor, to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs, get_block_absmax

    flat = rows.flatten()
    centred = get_block_absmax(flat, BLOCK) - scaler_mean
    groups = centred.numel() // SCALER_BLOCK
    group_max = get_block_absmax(centred, SCALER_BLOCK).unsqueeze(-1).expand(groups, SCALER_BLOCK)
    factor = 256 / (2 * group_max)
    scalers = (centred.view(groups, SCALER_BLOCK) * factor).round().clamp(-128, 127).flatten().to(torch.int8)
    table = to_nf4(torch.ones(NF4_GROUP, dtype=rows.dtype, device=rows.device)).nf4  # torchao's 16 values
    data = NF4Tensor.convert_to_norm_float_weight(rows, flat.numel() // BLOCK, BLOCK, table)
    meta = SubclassTensorArgs(rows.size(), rows.stride(), 0, rows.dtype, rows.device, False)
    return NF4Tensor(
        meta, BLOCK, flat.numel() // BLOCK, SCALER_BLOCK, scalers, factor[:, 0].contiguous(),
        scaler_mean.clone(), data, table,
    )  # fmt: skip


@torch.no_grad()
def _init_adapters(model: torch.nn.Module, seed: int) -> None:
    """LoRA A as peft draws it (Kaiming uniform), from a generator seeded by the run's seed and the name, so any
    number of ranks starts from the same adapters; B zero (the model starts as the base)."""
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        whole = torch.zeros(tuple(param.shape))
        if "lora_A" in name:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1.0 / param.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on a fan_in of shape[1]
            whole.uniform_(-bound, bound, generator=generator)
        if isinstance(param, DTensor):
            param.to_local().copy_(distribute_tensor(whole, param.device_mesh, param.placements).to_local())
        else:
            param.copy_(whole)


class ShardedQLoraBackend(Fsdp2Backend):
    """LoRA over a 4-bit base that FSDP2 shards: each rank holds its rows of the base and of the adapters."""

    # checkpoints hold the adapters and their optimizer state; the base is read again from model.path
    state_options = StateDictOptions(ignore_frozen_params=True, strict=False)
    checkpoint_kind = "a checkpoint of qlora with shard_base"

    keeps_reference_copy = False  # the reference is the base with the adapters disabled: no extra weights

    def _build_model(self) -> torch.nn.Module:
        return build_nf4_lora_model(self.config, self.parallel, self.mesh)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The 4-bit base alone (adapters disabled, eval mode)."""
        mode = self.model.training
        self.model.train(False)
        try:
            with self.model.disable_adapter():
                logits = self.model(input_ids=input_ids, use_cache=False).logits.float()
                # peft turns the adapters' requires_grad back on when the context ends: that must reach the
                # shards, not the gathered copies a unit that keeps them after its forward shows meanwhile
                resharded(self.model)
            return logits
        finally:
            self.model.train(mode)

    def _adapters(self) -> dict[str, torch.Tensor]:
        """The whole adapters (gathered on every rank, a collective), named as the qlora backend names them."""
        return {
            name: _whole(param).contiguous()
            for name, param in resharded(self.model).named_parameters()
            if param.requires_grad
        }

    def save(self, folder: Path) -> None:
        """The whole adapter file (rank 0) and every rank's rows of adapters and optimizer state."""
        adapters = self._adapters()
        if self.parallel.is_main:
            save_file(adapters, str(folder / ADAPTER_FILE))
        super().save(folder)

    def export(self, folder: Path) -> None:
        """The merged model in ``folder`` and the adapter in ``folder / "adapter"``, written by rank 0 from the
        gathered adapters over the whole NF4 base (as ``keeltune export --merge`` does from a checkpoint)."""
        adapters = self._adapters()
        if self.parallel.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(adapters, str(folder / ADAPTER_FILE))
            export_adapters(self.config, folder / ADAPTER_FILE, folder, merged_into=folder)
            (folder / ADAPTER_FILE).unlink()
        self.parallel.barrier()


def export_adapters(config: Config, adapter_file: Path, out: Path, *, merged_into: Path | None) -> None:
    """On one process, in host memory: the adapter as a peft folder (``out / "adapter"`` when merging into
    ``out``, else ``out``), and with ``merged_into`` the whole NF4 base dequantized with the adapters merged in
    (one matrix at a time)."""
    from keeltune.sharding.qlora import load_adapter_file, write_adapter, write_merged

    trained_on = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(config.sharding.qlora.compute_dtype, trained_on)  # the rows the run quantized
    # in host memory: the whole 4-bit base, which a sharded run's GPU may not hold
    model = build_nf4_lora_model(config, ParallelEnv(device=torch.device("cpu")), mesh=None, dtype=dtype)
    load_adapter_file(model, adapter_file)
    write_adapter(model, out / ADAPTER_DIR if merged_into == out else out)
    if merged_into is not None:
        write_merged(model, merged_into, config.model.path, dtype)
