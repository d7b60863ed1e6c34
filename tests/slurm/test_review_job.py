"""``keeltune review create --slurm`` on the real local cluster: the answers are generated in a job, which
writes the review; the same answers as on the login node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import SharedRun, keeltune
from tests.slurm.conftest import LocalSlurm

pytestmark = pytest.mark.slurm


def test_review_answers_generated_in_a_slurm_job(
    slurm_cluster: LocalSlurm, ddp_run: SharedRun, tmp_path: Path
) -> None:
    from keeltune.review.store import load_review
    from keeltune.training.review_answers import generate_answers, load_prompts, review_models

    run = ddp_run.copy(tmp_path)
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    saved["slurm"] = {"time": "5", "mem": "2000M", "env": ["OMP_NUM_THREADS=1"]}
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    refused = keeltune("review", "create", str(run.run_dir), "--slurm", "--prompts", "nope")
    assert refused.returncode == 2 and "neither a file nor a task" in refused.stderr  # before any job
    assert not (run.run_dir / "jobs.json").exists() and not (run.run_dir / "submitit").exists()
    done = keeltune(
        "review", "create", str(run.run_dir), "--slurm", "--n", "2", "--max-new-tokens", "4", "--name", "job",
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    job_id = done.stdout.split("submitted job ")[1].split(":")[0]
    assert slurm_cluster.wait_for_state(int(job_id), {"COMPLETED"}, timeout=60) == "COMPLETED"
    review = load_review(run.run_dir, "job")
    assert review.models == ["test", "base"] and len(review.items) == 2
    prompts = load_prompts(run.run_dir, None, None, 2, review.key["seed"], 4)
    here = generate_answers(run.run_dir, review_models(run.run_dir, []), prompts)
    for item in review.keyed_items():
        k = review.key["prompt_index"][item["id"]]
        assert {side: here[model][k] for side, model in item["models"].items()} == item["answers"]
    assert json.loads((review.folder / "key.json").read_text())["prompts"]["count"] == 2
