"""Create or reopen a run folder on the login node (no torch): resume only with a compatible config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from keeltune.atomic import write_atomically
from keeltune.config import RESUME_MUTABLE, Config, ConfigError, backend_spec, resume_differences
from keeltune.config.backends import fixed_ranks_refusal
from keeltune.run_folder import BASELINE_FILE, CONFIG_FILE, METRICS_FILE, STATE_FILE, logs_dir
from keeltune.training.manifest import damaged_checkpoints, newest_intact, no_intact_checkpoint


def prepare_run_dir(config: Config, ranks: int | None = None) -> tuple[Path, Path | None]:
    """Write the resolved config into ``runs/<name>/``; return the folder and the checkpoint to resume from.

    The checkpoint is the newest whose files have their manifest's sizes (the job checks checksums too, and
    moves damaged ones aside); a run whose checkpoints are all damaged is refused rather than started over, and
    so is a resume on ``ranks`` ranks from a checkpoint that only loads on the number that wrote it."""
    config.run.root = str(Path(config.run.root).resolve())
    run_dir = config.run_dir
    checkpoint, failed = newest_intact(run_dir, checksums=False)
    for folder, problems in failed:
        logging.getLogger("keeltune").warning(
            "%s looks damaged (%s): the run will move it aside and resume from an earlier checkpoint",
            folder, "; ".join(problems),
        )  # fmt: skip
    if checkpoint is None and (failed or damaged_checkpoints(run_dir)):
        moved = [note["checkpoint"] for note in damaged_checkpoints(run_dir)]
        raise no_intact_checkpoint(run_dir, [folder.name for folder, _ in failed] + moved)
    if checkpoint is not None and ranks is not None and backend_spec(config).fixed_ranks:
        written = json.loads((checkpoint / STATE_FILE).read_text()).get("world_size", ranks)
        if written != ranks:
            raise ConfigError(fixed_ranks_refusal(checkpoint, written, config.sharding.backend))
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
        logs_dir(run_dir).mkdir(parents=True, exist_ok=True)  # Slurm opens its output file there first
        if checkpoint is None:
            for stale in (METRICS_FILE, BASELINE_FILE):
                (run_dir / stale).unlink(missing_ok=True)
        write_atomically(saved, config.to_yaml())
    except PermissionError as err:
        raise ConfigError(
            f"run.root: cannot write the run folder {run_dir} ({err.strerror}); "
            "choose a writable folder with --set run.root=DIR"
        ) from None
    return run_dir, checkpoint
