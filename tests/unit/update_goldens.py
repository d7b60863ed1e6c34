"""Rewrite the golden files in ``tests/unit/golden/`` from the current renderers: the one way to update them.

    scripts/update-goldens            # rewrite every golden file (same as: python -m tests.unit.update_goldens)
    scripts/update-goldens --check    # rewrite nothing; list the golden files that differ, exit 1 if any

Then read ``git diff tests/unit/golden`` and commit the change only if it is what you meant. The tests
(``tests/unit/test_sbatch_render.py``) only ever compare against these files; they never write them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_COMMAND = "scripts/update-goldens"


def cluster_2x8_config():
    """A 2-node x 8-GPU Slurm run with every kind of setting the sbatch script renders."""
    from keeltune.config import config_from_dict

    return config_from_dict(
        {
            "run": {"name": "sft", "root": "/shared/runs"},
            "model": {"path": "/shared/models/base"},
            "data": {
                "train": [{"name": "task", "path": "/shared/data/train.jsonl", "format": "instruction"}]
            },
            "slurm": {
                "nodes": 2,
                "gpus_per_node": 8,
                "partition": "gpu",
                "time": "24:00:00",
                "account": "proj-42",
                "mem": "400G",
                "directives": ["--constraint=a100", "--exclusive"],
                "setup": ["module load cuda/12.4", "source /shared/envs/keeltune/bin/activate"],
                "env": ["NCCL_DEBUG=WARN", "HF_HOME=/shared/hf cache"],
            },
        }
    )


def render_cluster_2x8() -> str:
    from keeltune.launcher.sbatch import render_sbatch

    return render_sbatch(
        cluster_2x8_config(), Path("/shared/runs/sft"), python="/shared/envs/keeltune/bin/python"
    )


# every file in GOLDEN_DIR and what renders it (a test checks that the two sets are the same)
GOLDENS: dict[str, Callable[[], str]] = {"cluster-2x8.sbatch": render_cluster_2x8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=UPDATE_COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a golden file differs"
    )
    args = parser.parse_args(argv)
    stale = sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_file() and p.name not in GOLDENS)
    differ = []
    for name, render in sorted(GOLDENS.items()):
        path, text = GOLDEN_DIR / name, render()
        if path.is_file() and path.read_text() == text:
            print(f"unchanged  {path}")
            continue
        differ.append(name)
        if args.check:
            print(f"differs    {path}")
        else:
            path.write_text(text)
            print(f"rewritten  {path}")
    for name in stale:
        print(f"no renderer for {GOLDEN_DIR / name}: remove it, or add it to GOLDENS in {__file__}")
    return 1 if stale or (args.check and differ) else 0


if __name__ == "__main__":
    sys.exit(main())
