"""Backends that spread a model over ranks, behind one small interface (``base.Backend``)."""

from __future__ import annotations

from keeltune.config import Config
from keeltune.sharding.base import Backend
from keeltune.sharding.parallel import ParallelEnv


def build_backend(config: Config, parallel: ParallelEnv) -> Backend:
    """The backend named by ``sharding.backend``."""
    from keeltune.sharding.ddp import DDPBackend

    backends = {"ddp": DDPBackend}
    return backends[config.sharding.backend](config, parallel)
