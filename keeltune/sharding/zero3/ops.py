"""DeepSpeed's JIT-built ops: built once per environment, under a lock, with this environment's own ninja."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from keeltune.config import Config

log = logging.getLogger("keeltune")


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


def main() -> int:
    """``python -m keeltune.sharding.zero3``: build the ops a CPU run needs (run once at set-up)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    build_ops(["ShareMemCommBuilder"] if not torch.cuda.is_available() else [], at_setup=True)
    print(f"DeepSpeed ops ready in {ops_folder()}")
    return 0
