"""PyTorch FSDP2 (``fully_shard``) full fine-tuning: every parameter a DTensor sharded on dim 0 over the ranks.

The model is built on the meta device and each rank reads only its own rows of every weight from the
safetensors files, so no rank ever holds the whole model. Compute runs in the mixed-precision policy's dtype
(bf16 where asked) over fp32 master weights, gradients are reduce-scattered in fp32. Checkpoints are
``torch.distributed.checkpoint`` folders (one file per rank plus metadata) and load on any number of ranks;
the export streams one tensor at a time into a Hugging Face folder, with or without a process group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from keeltune.config import Config, ConfigError
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import LocalParameter
from keeltune.sharding.model import (
    add_neftune,
    autocast_dtype,
    causal_lm_config,
    decay_groups,
    enable_activation_checkpointing,
    reset_optimizer_state,
)
from keeltune.sharding.tensor_files import large_allocations_returned, model_tensor_files, write_tensor_file

log = logging.getLogger("keeltune")
DCP_FOLDER = (
    "dcp"  # a checkpoint's torch.distributed.checkpoint folder: __<rank>_0.distcp files and .metadata
)
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: modules of the classes the model says must not be split across devices."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def _shard(
    model: torch.nn.Module, mesh: Any, config: Config, parallel: ParallelEnv, *, cast: bool = True
) -> torch.device:
    """``fully_shard`` each block, then the root (embeddings, final norm, output layer); returns the device the
    shards live on (the host with offload). ``cast``: compute in ``training.precision``'s dtype (False: in the
    parameters' own, as a 4-bit base that dequantizes itself)."""
    settings = config.sharding.fsdp2
    compute = autocast_dtype(config.training.precision, parallel.device) if cast else None
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    offload: OffloadPolicy = OffloadPolicy()
    if settings.offload == "cpu":
        if parallel.device.type == "cuda":
            offload = CPUOffloadPolicy()
        else:
            log.info("sharding.fsdp2.offload: cpu has nothing to do on a CPU device; ignored")
    layers = _layers(model)
    if not layers:
        raise ConfigError(
            f"sharding.backend: fsdp2 finds no transformer blocks in {type(model).__name__} (its "
            "_no_split_modules names none); use backend ddp or zero3 for this architecture"
        )
    for index, layer in enumerate(layers):
        if settings.compile:
            layer.compile()
        # the last block is gathered again at once by the root's backward: no point in freeing it
        reshard = settings.reshard_after_forward and index < len(layers) - 1
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=offload)
    fully_shard(
        model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=policy,
        offload_policy=offload,
    )  # fmt: skip
    return torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else parallel.device


def local_rows(param: DTensor) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of a parameter sharded on dim 0."""
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return (offset[0], shape[0]) if param.dim() else (0, 1)


def _meta_model(config: Config) -> torch.nn.Module:
    """The model of ``model.path`` on the meta device (no memory, no initialisation), weights tied."""
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_config = causal_lm_config(config.model.path, dropout=config.regularization.dropout)
    with no_init_weights(), torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)](model_config)
    model.tie_weights()
    return model


@torch.no_grad()
def build_sharded_model(config: Config, mesh: Any, parallel: ParallelEnv) -> torch.nn.Module:
    """The model on the meta device, sharded, then each rank's rows read from the weight files."""
    model = _meta_model(config)
    model_config = model.config
    buffers = _computed_buffers(model, model_config)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.to_empty(device=_shard(model, mesh, config, parallel))
    files = model_tensor_files(Path(config.model.path))
    missing = [name for name, _ in model.named_parameters() if name not in files]
    if missing:  # every rank sees the same files, so every rank stops here together
        raise ConfigError(
            f"model.path: {config.model.path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    for name, param in model.named_parameters():
        local = param.to_local()
        first, rows = local_rows(param)
        row_size = local[0].numel() if local.dim() else 1
        if local.numel():
            values = files[name].read(name, first * row_size, rows * row_size)
            local.copy_(values.reshape(local.shape).to(local.dtype))
    for name, buffer in model.named_buffers():
        source = files[name].tensor(name) if name in files else buffers.get(name)
        if source is None:
            raise ConfigError(f"model.path: {config.model.path}: no values for the buffer {name}")
        buffer.copy_(source)
    for module in model.modules():  # buffers are used where the computation runs, offloaded or not
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(parallel.device)
    return model


def _computed_buffers(model: torch.nn.Module, model_config: Any) -> dict[str, torch.Tensor]:
    """Buffers the model computes from its config (rotary frequencies): a meta model leaves them empty, so they
    come from the same parameterless modules built again on the CPU."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) or not list(module.buffers(recurse=False)):
            continue
        real = _rebuilt(module, model_config)
        for name, buffer in real.named_buffers(recurse=False):
            found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def _rebuilt(module: torch.nn.Module, model_config: Any) -> torch.nn.Module:
    """A parameterless module with buffers, built again on the CPU from the model config."""
    try:
        return type(module)(config=model_config)
    except TypeError as err:
        raise ConfigError(
            f"sharding.backend: fsdp2 cannot compute the buffers of {type(module).__name__} from the model "
            f"config ({err}); use backend ddp or zero3 for this architecture"
        ) from None


class Fsdp2Backend:
    """Full fine-tuning with FSDP2; the loop sees the same interface as the other backends."""

    partitioned = True  # each rank holds rows of every parameter and of its gradient
    state_options: StateDictOptions | None = None  # which parameters checkpoints hold (None: all)
    checkpoint_kind = "an FSDP2 checkpoint"

    def __init__(self, config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> None:
        parallel.ensure_process_group()
        self.config, self.parallel = config, parallel
        self.grad_clip = config.training.grad_clip
        self.mesh = init_device_mesh(parallel.device.type, (dist.get_world_size(),))
        with large_allocations_returned():
            self.model = self._build_model()
        add_neftune(self.model, config.regularization.neftune_alpha)
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, config.regularization.weight_decay),
            lr=config.training.lr,
            betas=tuple(config.training.betas),
            eps=config.training.eps,
            foreach=True,
        )
        self.reference: torch.nn.Module | None = None
        if keep_reference and self.keeps_reference_copy:  # the base sharded the same way: 1/N per rank
            with large_allocations_returned():
                self.reference = build_sharded_model(config, self.mesh, parallel)
            self.reference.eval().requires_grad_(False)

    keeps_reference_copy = True  # False: reference_logits needs no second model (adapters switched off)

    def _build_model(self) -> torch.nn.Module:
        """The trained model, sharded over ``self.mesh``."""
        return build_sharded_model(self.config, self.mesh, self.parallel)

    def forward_backward(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *, sync_grads: bool
    ) -> torch.Tensor:
        _gradient_sync(self.model, sync_grads)  # accumulate unreduced until the last micro-batch
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = loss_fn(logits.float())
        loss.backward()
        return loss.detach()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._trainable(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def reset_optimizer(self) -> None:
        reset_optimizer_state(self.optimizer)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits.float()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """Every rank runs every forward until all ranks are done (their batches may need different lengths)."""
        return self.model.generate(input_ids=input_ids, synced_gpus=self.parallel.distributed, **options)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("reference_logits needs a backend built with keep_reference=True")
        return self.reference(input_ids=input_ids, use_cache=False).logits.float()

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in resharded(self.model).parameters() if p.requires_grad]

    def local_parameters(self) -> list[LocalParameter]:
        """This rank's rows of every parameter (fp32); a gradient added lands in its rows of the reduced
        gradient before clipping, as under ddp."""
        return [
            LocalParameter(name, _local(param).detach(), _gradient_adder(param))
            for name, param in resharded(self.model).named_parameters()
            if param.requires_grad
        ]

    def local_gradients(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """This rank's rows of the gradient, averaged over ranks: every rank must pass the same batch (then it
        is that batch's gradient). Leaves the parameters' gradients as they were."""
        params = [(name, p) for name, p in resharded(self.model).named_parameters() if p.requires_grad]
        kept = [p.grad for _, p in params]
        for _, param in params:
            param.grad = None
        try:
            _gradient_sync(self.model, True)
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            loss_fn(logits.float()).backward()
            return {
                name: _local(param.grad).detach().clone()
                if param.grad is not None
                else torch.zeros_like(_local(param))
                for name, param in params
            }
        finally:
            for (_, param), grad in zip(params, kept, strict=True):
                param.grad = grad

    def _state(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(
            resharded(self.model), self.optimizer, options=self.state_options
        )
        return {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}

    def save(self, folder: Path) -> None:
        """Each rank writes its own rows of the model and optimizer state (``dcp/__<rank>_0.distcp``)."""
        dcp.save(self._state(), checkpoint_id=folder / DCP_FOLDER)

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote, on any number of ranks: each reads the rows it now holds."""
        if not (folder / DCP_FOLDER / ".metadata").is_file():
            raise ConfigError(
                f"{folder}: not {self.checkpoint_kind} (no {DCP_FOLDER}/.metadata); was it written by another "
                "backend or other sharding settings?"
            )
        state = self._state()
        dcp.load(state, checkpoint_id=folder / DCP_FOLDER)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state[MODEL_KEY],
            optim_state_dict=state[OPTIMIZER_KEY],
            options=self.state_options,
        )

    def export(self, folder: Path) -> None:
        """Rank 0 writes one safetensors file, gathering one tensor at a time (all ranks take part)."""
        tensors = dict(_exported_tensors(resharded(self.model)))
        with large_allocations_returned():
            self._write_export(folder, tensors)
        self.parallel.barrier()

    def _write_export(self, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        if self.parallel.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            layout = [(name, torch.float32, list(t.shape)) for name, t in tensors.items()]
            write_tensor_file(folder / "model.safetensors", layout, lambda name: _whole(tensors[name]))
            self.model.config.save_pretrained(folder)
        else:
            for tensor in tensors.values():
                _whole(tensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor; a tensor that is not sharded (one rank's 4-bit base) itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def resharded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every FSDP unit's parameters back to their shards: a unit that keeps its gathered weights
    after a forward (the root, or ``reshard_after_forward: false``) otherwise shows those as its parameters."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    if hasattr(model, "set_requires_gradient_sync"):  # not sharded (one rank): nothing to reduce
        model.set_requires_gradient_sync(sync)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter gathered whole on every rank (a collective), as fp32 on the CPU."""
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full.detach().float().cpu()


def _exported_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once) and persistent buffers, as a Hugging Face folder stores them."""
    yield from model.named_parameters()
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def _gradient_adder(param: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
    @torch.no_grad()
    def add(gradient: torch.Tensor) -> None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        _local(param.grad).add_(gradient.to(param.grad.dtype))

    return add


def build(config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> Fsdp2Backend:
    return Fsdp2Backend(config, parallel, keep_reference=keep_reference)


def export_checkpoint(config: Config, checkpoint: Path, out: Path, *, merge: bool = False) -> list[Path]:
    """An FSDP2 checkpoint as a Hugging Face folder without a process group: fp32 weights read from the
    distributed checkpoint one tensor at a time, the model config beside them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = checkpoint / DCP_FOLDER
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(
            f"{checkpoint}: no {DCP_FOLDER}/.metadata (is this a checkpoint of an fsdp2 run?)"
        )
    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = f"{MODEL_KEY}."
    names = [name for name, _ in _exported_tensors(_meta_model(config))]  # tied weights once, as exported
    unknown = [name for name in names if not isinstance(stored.get(prefix + name), TensorStorageMetadata)]
    if unknown:
        raise ValueError(f"{checkpoint}: the checkpoint lacks {unknown[:3]} (written for another model?)")
    layout = [(name, torch.float32, list(stored[prefix + name].size)) for name in names]

    def produce(name: str) -> torch.Tensor:
        entry = stored[prefix + name]
        tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
        dcp.load({MODEL_KEY: {name: tensor}}, storage_reader=FileSystemReader(str(folder)), no_dist=True)
        return tensor.float()

    out.mkdir(parents=True, exist_ok=True)
    with large_allocations_returned():
        write_tensor_file(out / "model.safetensors", layout, produce)
    causal_lm_config(config.model.path, dropout=config.regularization.dropout).save_pretrained(out)
    return [out]
