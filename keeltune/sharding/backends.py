"""The backend named by ``sharding.backend``, built or exported through its module in the backend registry
(``keeltune.config.backends``), imported only now: a DDP run never imports DeepSpeed or bitsandbytes."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from keeltune.config import Config, backend_spec
from keeltune.distributed import ParallelEnv
from keeltune.sharding.base import Backend


def implementation(config: Config) -> ModuleType:
    """The module of this config's backend: ``build(config, parallel, *, keep_reference)`` and
    ``export_checkpoint(config, checkpoint, out, *, merge)``."""
    return importlib.import_module(backend_spec(config).module)


def build_backend(config: Config, parallel: ParallelEnv, *, keep_reference: bool = False) -> Backend:
    """``keep_reference``: keep the pretrained model for ``reference_logits`` (a regularizer asks for it)."""
    return implementation(config).build(config, parallel, keep_reference=keep_reference)


def export_checkpoint(config: Config, checkpoint: Path, out: Path, *, merge: bool = False) -> list[Path]:
    """Write a checkpoint of this config's backend as a Hugging Face folder, without a process group.

    Returns the folders written (an adapter backend writes the adapter folder, and with ``merge`` the merged
    model too)."""
    if merge and not backend_spec(config).adapters:
        raise ValueError(
            f"--merge applies to backends that train adapters over a frozen base; this run is "
            f"{config.sharding.backend}"
        )
    return implementation(config).export_checkpoint(config, checkpoint, out, merge=merge)
