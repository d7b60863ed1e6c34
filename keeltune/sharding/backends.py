"""The backend named by ``sharding.backend``, and the offline export of its checkpoints."""

from __future__ import annotations

from pathlib import Path

from keeltune.config import Config
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import Backend


def build_backend(config: Config, parallel: ParallelEnv) -> Backend:
    """Imported lazily: a DDP run never imports DeepSpeed or bitsandbytes."""
    name = config.sharding.backend
    if name == "zero3":
        from keeltune.sharding.zero3 import Zero3Backend

        return Zero3Backend(config, parallel)
    if name == "qlora":
        from keeltune.sharding.qlora import QLoraBackend

        return QLoraBackend(config, parallel)
    from keeltune.sharding.ddp import DDPBackend

    return DDPBackend(config, parallel)


def export_checkpoint(config: Config, checkpoint: Path, out: Path, *, merge: bool = False) -> list[Path]:
    """Write a checkpoint of this config's backend as a Hugging Face folder, without a process group.

    Returns the folders written (QLoRA writes the adapter folder, and with ``merge`` a merged model too)."""
    name = config.sharding.backend
    if name == "zero3":
        from keeltune.sharding.zero3 import export_zero3_checkpoint

        return export_zero3_checkpoint(config, checkpoint, out)
    if name == "qlora":
        from keeltune.sharding.qlora import export_qlora_checkpoint

        return export_qlora_checkpoint(config, checkpoint, out, merge=merge)
    if merge:
        raise ValueError("--merge applies to QLoRA runs (adapters merged into the base); this run is ddp")
    from keeltune.sharding.ddp import export_ddp_checkpoint

    return export_ddp_checkpoint(config, checkpoint, out)
