"""Create or reopen a run folder on the login node (no torch): resume only with a compatible config."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from keeltune.config import RESUME_MUTABLE, Config, ConfigError, resume_differences
from keeltune.training.run_files import BASELINE_FILE, CONFIG_FILE, METRICS_FILE, latest_checkpoint


def prepare_run_dir(config: Config) -> tuple[Path, Path | None]:
    """Write the resolved config into ``runs/<name>/``; return the folder and the checkpoint to resume from."""
    config.run.root = str(Path(config.run.root).resolve())
    run_dir = config.run_dir
    checkpoint = latest_checkpoint(run_dir)
    saved = run_dir / CONFIG_FILE
    if checkpoint is not None and saved.is_file():
        differences = resume_differences(yaml.safe_load(saved.read_text()), config.to_dict())
        if differences:
            raise ConfigError(
                f"{run_dir} has a checkpoint ({checkpoint.name}) made with another config; these training-relevant "
                "keys differ (saved -> now):\n" + "\n".join(differences) + "\n"
                f"A resume may change only {', '.join(RESUME_MUTABLE)}. Restore those values to resume, or start "
                "a new run with --set run.name=NEW_NAME."
            )
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens its output file there first
        if checkpoint is None:
            for stale in (METRICS_FILE, BASELINE_FILE):
                (run_dir / stale).unlink(missing_ok=True)
        tmp = run_dir / f".{CONFIG_FILE}.tmp"
        tmp.write_text(config.to_yaml())
        os.replace(tmp, saved)
    except PermissionError as err:
        raise ConfigError(
            f"run.root: cannot write the run folder {run_dir} ({err.strerror}); "
            "choose a writable folder with --set run.root=DIR"
        ) from None
    return run_dir, checkpoint
