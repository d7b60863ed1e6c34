"""``keeltune review create --slurm``: the answers generated in a Slurm job (a model too big for the login
node), which writes the review into the run folder; serving it needs no GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from keeltune.config import load_config
from keeltune.launcher.submit import executor_for, submission_refused
from keeltune.review.store import new_review_folder, write_review
from keeltune.run_folder import CONFIG_FILE


class ReviewJob:
    """The callable submitit pickles: ``review_items`` with ``keeltune review create``'s options, on the node."""

    def __init__(self, run_dir: Path, name: str, options: dict[str, Any]) -> None:
        self.run_dir, self.name, self.options = Path(run_dir), name, options

    def __call__(self) -> str:
        from keeltune.training.review_answers import review_items  # torch: on the node only

        folder = new_review_folder(self.run_dir, self.name)
        items, key = review_items(self.run_dir, **self.options)
        write_review(folder, items, key)
        return str(folder)


def submit_review(run_dir: Path, name: str, options: dict[str, Any], *, local: bool = False) -> Any:
    """Submit the generation of review ``name`` as one task on one node, with the run's ``slurm`` resources
    (its GPUs shared by ``options["nproc"]`` local ranks); returns submitit's job."""
    config = load_config(run_dir / CONFIG_FILE)
    config = dataclasses.replace(config, slurm=dataclasses.replace(config.slurm, nodes=1))
    executor = executor_for(config, run_dir, local=local)
    executor.update_parameters(name=f"review-{name}", tasks_per_node=1)
    try:
        return executor.submit(ReviewJob(run_dir.resolve(), name, options))
    except Exception as err:  # submitit wraps sbatch's refusal in its own error
        raise submission_refused(config, str(err)) from None
