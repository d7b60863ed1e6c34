"""Start the per-rank entry on this machine: in-process for one rank, through torch's launcher for more."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun_command(run_dir: Path, nproc: int) -> list[str]:
    """torch's own launcher, one process per rank, on a free local port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "keeltune.launcher.entry",
        str(run_dir),
    ]


def run_local(run_dir: Path, nproc: int) -> int:
    """Train on this machine with ``nproc`` ranks; return the exit status."""
    if nproc == 1:
        from keeltune.launcher.entry import main as entry_main

        return entry_main([str(run_dir)])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(run_dir, nproc), env=env, check=False).returncode
