"""The one per-rank entry point: local processes, Slurm jobs and multi-node runs all start this."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from keeltune.training.run_files import CONFIG_FILE


def setup_logging(run_dir: Path, rank: int) -> None:
    """Prefix every line with rank and node; rank 0 talks on the console, every rank writes its own log file."""
    node = socket.gethostname()
    formatter = logging.Formatter(f"%(asctime)s [rank{rank}/{node}] %(levelname)s %(message)s", "%H:%M:%S")
    logger = logging.getLogger("keeltune")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    logger.addHandler(console)
    (run_dir / "logs").mkdir(exist_ok=True)
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    file_handler.setFormatter(formatter)
    logger.addHandler(file_handler)


def set_threads(local_world_size: int) -> None:
    """Share the cores between local ranks on CPU; tell DeepSpeed there is no accelerator to look for."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))


def train_rank(run_dir: Path):
    """Join the ranks, build the trainer from the run folder's config, train, and clean up."""
    from keeltune.config import load_config
    from keeltune.sharding.parallel import ParallelEnv
    from keeltune.training.trainer import Trainer

    config = load_config(run_dir / CONFIG_FILE)
    setup_logging(run_dir, int(os.environ.get("RANK", 0)))
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    parallel = ParallelEnv.from_environment()
    trainer = None
    try:
        trainer = Trainer(config, parallel)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        parallel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keeltune.launcher.entry", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="run folder holding config.yaml")
    args = parser.parse_args(argv)
    from keeltune.config import ConfigError
    from keeltune.data_pipeline.prepare import DataError

    try:
        train_rank(args.run_dir.resolve())
    except (ConfigError, DataError) as err:
        logging.getLogger("keeltune").error("error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
