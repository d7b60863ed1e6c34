"""The layout of a run folder (torch-free, so the login node can read it)."""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
BASELINE_FILE = "baseline.json"
BEST_FILE = "best.json"  # the step with the best val/loss seen by early stopping
FINAL_MODEL_DIR = "final"
BEST_MODEL_DIR = "best"  # retention_guard action best: the model with the best task + retention score
BEST_MODEL_FILE = "keeltune_best.json"  # in BEST_MODEL_DIR: its step, score and eval results
WANDB_ID_FILE = "wandb_run_id"  # one W&B run per run folder, across resumes and requeues
JOB_FILE = "jobs.json"  # what `keeltune launch` submitted, for status / logs / cancel
_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder counts once its trainer state is in it)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
