"""Start the per-rank entry on this machine: in-process for one rank, through torch's launcher for more."""

from __future__ import annotations

from pathlib import Path


def run_local(run_dir: Path, nproc: int) -> int:
    """Train on this machine with ``nproc`` ranks; return the exit status. One rank trains in this process,
    which then ends like every rank (``exit_rank``: no interpreter finalization, where a finished or failed
    rank's leftover threads can abort it)."""
    if nproc == 1:
        from keeltune.distributed import exit_rank
        from keeltune.launcher.entry import main as entry_main

        exit_rank(entry_main([str(run_dir)]))
    from keeltune.distributed import run_local_ranks

    return run_local_ranks(nproc, "keeltune.launcher.entry", str(run_dir))
