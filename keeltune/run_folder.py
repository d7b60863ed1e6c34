"""The layout of a run folder (torch-free, so the login node can read it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # in a checkpoint: each file's size and sha256, written last
BASELINE_FILE = "baseline.json"
BIAS_DIR = "bias"  # keeltune eval --bias: step_<N>.json, the results and each item's log-likelihoods
BIAS_BASELINE_FILE = "bias_baseline.json"  # the base model's log-likelihoods of every bias probe item, step 0
# keeltune sweep's decision to stop this trial at its next eval (why, at which step)
PRUNE_FILE = "prune.json"
BEST_FILE = "best.json"  # the step with the best val/loss seen by early stopping
FINAL_MODEL_DIR = "final"
BEST_MODEL_DIR = "best"  # retention_guard action best: the model with the best task + retention score
BEST_MODEL_FILE = "keeltune_best.json"  # in BEST_MODEL_DIR: its step, score and eval results
WANDB_ID_FILE = "wandb_run_id"  # one W&B run per run folder, across resumes and requeues
JOB_FILE = "jobs.json"  # what `keeltune launch` submitted, for status / logs / cancel
CHECKPOINTS_DIR = "checkpoints"  # step_NNNNNNN folders
LOGS_DIR = "logs"
RANK_LOG = "rank{rank}.log"  # in LOGS_DIR: each rank's log
RANK_RECORD = "rank{rank}.json"  # in LOGS_DIR: each rank's heartbeat and ending (launcher.rank_records)
SLURM_LOG = "slurm-{job_id}.out"  # in LOGS_DIR: the output of the standalone sbatch script
SUBMITIT_DIR = "submitit"  # submitit's own files, one folder per job
WANDB_DIR = "wandb"  # made by W&B in the run folder (offline runs stay there)
REPORT_DIR = "report"  # `keeltune report`'s plots and summary, by default
REPORT_FILE = "report.md"  # in REPORT_DIR
VOCABULARY_FILE = "keeltune_vocabulary.json"  # in the extended base (model.extend_vocabulary): what was added
_STEP_DIR = re.compile(r"step_(\d+)")


EVAL_DIR = "eval"  # per-item task results: eval/<step>/<task>.jsonl
LM_EVAL_DIR = "lm_eval"  # keeltune eval --lm-eval results: lm_eval/step_<N>.json


def eval_items_file(run_dir: Path, step: int, task: str) -> Path:
    """Where one eval's per-item results of ``task`` go."""
    return run_dir / EVAL_DIR / str(step) / f"{task}.jsonl"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def logs_dir(run_dir: Path) -> Path:
    return run_dir / LOGS_DIR


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first: ``step_NNNNNNN`` holding its trainer state or its manifest (a folder
    appears under that name only once complete; whether it is still intact, ``training.manifest`` checks)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and ((entry / STATE_FILE).is_file() or (entry / MANIFEST_FILE).is_file()):
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def follow_umask(folder: Path) -> None:
    """Give the files and folders under ``folder`` the permissions the umask asks for: safetensors writes its
    files private (0600), and colleagues on a cluster could not read a model or checkpoint in a shared place."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


REVIEW_DIR = "review"  # human reviews: review/<name>/ (keeltune.review.store)
