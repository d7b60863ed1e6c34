"""DeepSpeed ZeRO-3 full fine-tuning: parameters, gradients and optimizer state partitioned over the ranks.

``deepspeed.initialize`` is called directly (accelerate and HF Trainer mis-detect ranks on CPU). The model is
built under ``deepspeed.zero.Init`` and its weights are streamed in one module at a time, so no rank ever holds
the whole model. Checkpoints are DeepSpeed's own (optimizer state included, resumable with the same number of
ranks) plus every rank's fp32 partition as safetensors, from which ``export`` streams a Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from keeltune.config import Config, ConfigError, RegularizationConfig
from keeltune.distributed import ParallelEnv
from keeltune.sharding.model import (
    autocast_dtype,
    causal_lm_config,
    decay_groups,
    enable_activation_checkpointing,
    sample_sequences,
)
from keeltune.sharding.penalties import add_neftune
from keeltune.sharding.plan import deepspeed_config, model_hidden_size
from keeltune.sharding.tensor_files import TensorFile, model_tensor_files, write_tensor_file

log = logging.getLogger("keeltune")
DEEPSPEED_TAG = "zero"
LAYOUT_FILE = "zero_layout.json"
BUFFERS_FILE = "zero_buffers.safetensors"
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
# DeepSpeed 0.19 calls collectives that torch 2.13 renamed, with a warning on every call
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)


def partition_file(folder: Path, rank: int) -> Path:
    return folder / f"zero_fp32_rank{rank:04d}.safetensors"


# --------------------------------------------------------------------------- DeepSpeed's JIT-built ops


def ops_folder() -> Path:
    """Where DeepSpeed's JIT ops are built: $TORCH_EXTENSIONS_DIR, else one folder per environment (its
    Python, torch and DeepSpeed versions and its prefix)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import deepspeed

    # one folder per environment: another venv's build compiles against other header paths and would
    # rebuild (and replace) the library in place while this one loads it
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-ds{deepspeed.__version__}"
    folder = (
        Path.home()
        / ".cache"
        / "keeltune"
        / "torch_extensions"
        / f"{version}-{environment}".replace("+", "_")
    )
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def build_ops(names: list[str], *, at_setup: bool = False) -> None:
    """Build (or just load) DeepSpeed ops once, under an exclusive lock on the build folder.

    Ranks on one node (or on nodes sharing the folder) never compile into it at the same time; the lock is
    the kernel's, so a rank that dies while building does not leave the others waiting forever. The build uses
    this environment's own ninja whatever PATH says (set-up and ranks ran different ninjas, whose logs differ,
    and every first run compiled again); a build outside set-up is reported, with how long it took."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    folder = ops_folder()
    folder.mkdir(parents=True, exist_ok=True)
    own_bin = str(Path(sys.executable).parent)
    if (Path(own_bin) / "ninja").is_file() and not os.environ.get("PATH", "").startswith(
        own_bin + os.pathsep
    ):
        os.environ["PATH"] = own_bin + os.pathsep + os.environ.get("PATH", "")
    with open(folder / "keeltune-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            builder = get_accelerator().create_op_builder(name)
            if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                continue
            ninja_log = folder / builder.NAME / ".ninja_log"
            before = ninja_log.read_bytes() if ninja_log.is_file() else b""
            started = time.perf_counter()
            builder.load(verbose=False)
            if not at_setup and ninja_log.is_file() and ninja_log.read_bytes() != before:
                log.warning(
                    "DeepSpeed op %s was compiled now, in %.0f s (%s): it was not built for this environment "
                    "or its build flags changed; run `python -m keeltune.sharding.zero3` once after changing "
                    "the environment so jobs do not compile", builder.NAME, time.perf_counter() - started,
                    folder / builder.NAME,
                )  # fmt: skip


def needed_ops(config: Config, device: torch.device) -> list[str]:
    names = ["ShareMemCommBuilder"] if device.type == "cpu" else []
    if config.sharding.zero3.offload_optimizer == "cpu":
        names.append("CPUAdamBuilder")
    return names


# --------------------------------------------------------------------------- building the partitioned model


@contextlib.contextmanager
def large_allocations_returned() -> Iterator[None]:
    """While streaming weights, let glibc give every block over 1 MiB straight back to the system.

    Its default threshold adapts upwards as big blocks are freed, after which freed tensors stay in the heap
    and a rank's peak memory grows with every module loaded (measured: +300 MB instead of +23 MB for a
    222 MB model on 2 ranks). Afterwards the threshold is left at glibc's own upper bound (32 MiB)."""
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


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


# --------------------------------------------------------------------------- the backend


class PartitionAnchor:
    """L2-SP and EWC under ZeRO-3, on this rank's partitions only: the pretrained values (and the Fisher) are
    partitioned like the parameters (each 1/N of an fp32 model per rank); the penalty is summed over partitions
    and all-reduced, and its gradient, w * (theta - theta_0) or w * F * (theta - theta_0), is added to this
    rank's partition of the reduced gradient before the optimizer step (so clipping sees it, as under ddp)."""

    def __init__(
        self, params: list[tuple[str, torch.nn.Parameter]], reg: RegularizationConfig, parallel: ParallelEnv
    ) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        self.params, self.parallel = params, parallel
        self.l2sp_weight, self.ewc_weight = reg.l2sp.weight, reg.ewc.weight
        self.anchors: dict[str, torch.Tensor] = {}
        if self.l2sp_weight > 0 or self.ewc_weight > 0:
            self.anchors = {n: safe_get_local_fp32_param(p).detach().clone() for n, p in params}
        self.fisher: dict[str, torch.Tensor] = {}

    def set_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        wrong = sorted({n for n, _ in self.params} ^ set(fisher)) or [
            n for n, _ in self.params if fisher[n].numel() != self.anchors[n].numel()
        ]
        if wrong:
            raise ValueError(f"EWC Fisher does not fit this rank's parameter partitions (e.g. {wrong[:3]})")
        self.fisher = {n: fisher[n].reshape(self.anchors[n].shape).float() for n, _ in self.params}

    def add_gradients(self) -> dict[str, float]:
        if not self.anchors:
            return {}
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        if self.ewc_weight > 0 and not self.fisher:
            raise RuntimeError("EWC is on but no Fisher was set (the trainer estimates it before training)")
        sums = torch.zeros(2, dtype=torch.float64, device=self.parallel.device)  # 1/2 |d|^2, 1/2 F d^2
        for name, param in self.params:
            change = safe_get_local_fp32_param(param) - self.anchors[name]
            update = torch.zeros_like(change)
            if self.l2sp_weight > 0:
                sums[0] += 0.5 * (change.double() ** 2).sum()
                update += self.l2sp_weight * change
            if self.ewc_weight > 0:
                sums[1] += 0.5 * (self.fisher[name].double() * change.double() ** 2).sum()
                update += self.ewc_weight * self.fisher[name] * change
            safe_set_local_grad(param, safe_get_local_grad(param) + update)
        self.parallel.all_reduce_sum(sums)
        values = {}
        if self.l2sp_weight > 0:
            values["train/l2sp"] = self.l2sp_weight * float(sums[0])
        if self.ewc_weight > 0:
            values["train/ewc"] = self.ewc_weight * float(sums[1])
        return values


class Zero3Backend:
    """Full fine-tuning with DeepSpeed ZeRO-3; the loop sees the same interface as plain data parallel."""

    partitioned = True  # each rank holds a slice of every parameter and of its gradient

    def __init__(self, config: Config, parallel: ParallelEnv) -> None:
        import deepspeed

        self.parallel = parallel
        build_ops(needed_ops(config, parallel.device))
        parallel.ensure_process_group()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        bf16 = autocast_dtype(config.training.precision, parallel.device) is not None
        self.ds_config = deepspeed_config(
            config, parallel.world_size, bf16=bf16, hidden_size=model_hidden_size(config.model.path)
        )
        with large_allocations_returned():
            model = load_partitioned_model(config, self.ds_config, parallel)
        if config.model.gradient_checkpointing:
            enable_activation_checkpointing(model)
        add_neftune(model, config.regularization.neftune_alpha)
        training = config.training
        groups = decay_groups(model, config.regularization.weight_decay)
        if config.sharding.zero3.offload_optimizer == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=training.lr, betas=tuple(training.betas), eps=training.eps, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(
                groups,
                lr=training.lr,
                betas=tuple(training.betas),
                eps=training.eps,
                fused=parallel.device.type == "cuda",  # one kernel over each flat partition on GPUs
            )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config
        )
        self.model = self.engine.module
        reg = config.regularization
        self.reference = self._reference_engine(config) if reg.kl.weight > 0 else None
        self.anchor = PartitionAnchor(self._named_parameters(), reg, parallel)

    def forward_backward(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], *, sync_grads: bool
    ) -> torch.Tensor:
        logits = self.engine(input_ids=input_ids, use_cache=False).logits
        loss = loss_fn(logits.float())
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already scales by the global batch
        if not sync_grads:
            self.engine.step()  # counts the micro-step; DeepSpeed applies the optimizer only at the boundary
        return loss.detach()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids=input_ids, use_cache=False).logits.float()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def sample(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        return sample_sequences(self.model, input_ids, synced_gpus=self.parallel.distributed, **options)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("no reference model: regularization.kl.weight is 0")
        return self.reference(input_ids=input_ids, use_cache=False).logits.float()

    def _reference_engine(self, config: Config) -> Any:
        """The base model, frozen and partitioned like the trained one (no gradients, no optimizer state): it
        costs each rank 1/N of the model in the training dtype, plus one gathered layer during its forward."""
        import deepspeed

        with large_allocations_returned():
            reference = load_partitioned_model(config, self.ds_config, self.parallel)
        reference.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=reference, config=self.ds_config)  # forward only
        engine.eval()
        return engine

    def add_penalties(self) -> dict[str, float]:
        return self.anchor.add_gradients()

    def parameter_gradients(
        self, input_ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """This rank's partition of the gradient, reduced over ranks: every rank must pass the same batch (then
        the reduced gradient is that batch's). Leaves no gradient behind and no micro-step counted."""
        from deepspeed.utils import safe_get_local_grad

        self.engine.set_gradient_accumulation_boundary(True)  # reduce and partition in this backward
        try:
            logits = self.engine(input_ids=input_ids, use_cache=False).logits
            self.engine.backward(loss_fn(logits.float()), scale_wrt_gas=False)
            return {
                name: safe_get_local_grad(param).detach().clone() for name, param in self._named_parameters()
            }
        finally:
            self.optimizer.zero_grad()
            self.engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step count

    def set_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        self.anchor.set_fisher(fisher)

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.model.named_parameters())  # tied weights appear once

    def _write_partitions(self, folder: Path) -> None:
        """This rank's fp32 partition of every parameter; rank 0 adds the layout and persistent buffers."""
        from deepspeed.utils import safe_get_local_fp32_param
        from safetensors.torch import save_file

        params = self._named_parameters()
        save_file(
            {
                name: safe_get_local_fp32_param(p).detach().reshape(-1).cpu().contiguous()
                for name, p in params
            },
            str(partition_file(folder, self.parallel.rank)),
        )
        if self.parallel.is_main:
            layout = {
                "world_size": self.parallel.world_size,
                "params": [[name, list(p.ds_shape)] for name, p in params],
            }
            (folder / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
            buffers = {name: b.detach().cpu().contiguous() for name, b in _persistent_buffers(self.model)}
            if buffers:
                save_file(buffers, str(folder / BUFFERS_FILE))

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)
        self._write_partitions(folder)

    def load(self, folder: Path) -> None:
        layout_file = folder / LAYOUT_FILE
        if not layout_file.is_file():
            raise ConfigError(
                f"{folder}: not a ZeRO-3 checkpoint (no {LAYOUT_FILE}); was it written by another backend?"
            )
        saved = json.loads(layout_file.read_text())["world_size"]
        if saved != self.parallel.world_size:
            raise ConfigError(
                f"{folder}: this ZeRO-3 checkpoint was written by {saved} rank(s) and its optimizer state is "
                f"partitioned that way; resume with {saved} rank(s) (e.g. --nproc {saved} or "
                f"nodes x gpus_per_node = {saved}), or `keeltune export` it and start a new run from the export"
            )
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise ConfigError(f"{folder}: DeepSpeed found no checkpoint under tag {DEEPSPEED_TAG!r}")

    def export(self, folder: Path) -> None:
        parts = folder / ".zero-partitions"
        if self.parallel.is_main:
            parts.mkdir(parents=True, exist_ok=True)
        self.parallel.barrier()
        self._write_partitions(parts)
        self.parallel.barrier()
        if self.parallel.is_main:
            consolidate(parts, folder / "model.safetensors")
            self.model.config.save_pretrained(folder)
            shutil.rmtree(parts)


def _persistent_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = []
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
    return found


# --------------------------------------------------------------------------- export without a process group


def consolidate(partitions: Path, out_file: Path) -> None:
    """Join every rank's fp32 partitions into one safetensors file, one tensor at a time."""
    layout_file = partitions / LAYOUT_FILE
    if not layout_file.is_file():
        raise FileNotFoundError(f"{partitions}: no {LAYOUT_FILE}; is this a checkpoint of a zero3 run?")
    layout = json.loads(layout_file.read_text())
    world = layout["world_size"]
    ranks = []
    for rank in range(world):
        path = partition_file(partitions, rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the checkpoint was written by {world} ranks)")
        ranks.append(TensorFile(path))
    buffers = TensorFile(partitions / BUFFERS_FILE) if (partitions / BUFFERS_FILE).is_file() else None
    shapes = {name: shape for name, shape in layout["params"]}
    entries = [(name, torch.float32, shape) for name, shape in layout["params"]]
    if buffers is not None:
        entries += [(name, buffers.dtype(name), buffers.shape(name)) for name in buffers.names()]

    def produce(name: str) -> torch.Tensor:
        if name not in shapes:
            return buffers.tensor(name)
        numel, part = math.prod(shapes[name]), ranks[0].shape(name)[0]
        pieces = [
            files.read(name, 0, min(part, numel - rank * part))
            for rank, files in enumerate(ranks)
            if rank * part < numel
        ]
        return torch.cat(pieces).reshape(shapes[name])

    write_tensor_file(out_file, entries, produce)


def export_zero3_checkpoint(config: Config, checkpoint: Path, out: Path) -> list[Path]:
    """A ZeRO-3 checkpoint as a Hugging Face folder (fp32 weights, streamed; the model config beside them)."""
    out.mkdir(parents=True, exist_ok=True)
    with large_allocations_returned():
        consolidate(checkpoint, out / "model.safetensors")
    causal_lm_config(config.model.path, dropout=config.regularization.dropout).save_pretrained(out)
    return [out]


def main() -> int:
    """``python -m keeltune.sharding.zero3``: build the ops a CPU run needs (run once at set-up)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    build_ops(["ShareMemCommBuilder"] if not torch.cuda.is_available() else [], at_setup=True)
    print(f"DeepSpeed ops ready in {ops_folder()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
