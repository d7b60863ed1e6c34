"""``keeltune launch --local``: the submitit job on this machine; and what launch refuses before anything is
queued. A rank that never reaches the preflight barrier is named instead of hanging."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import SharedRun, base_config, keeltune, train_losses, write_config

PREFLIGHT = """
import os, sys, time
import torch.distributed as dist
from keeltune.distributed import ParallelEnv
if os.environ["RANK"] == "1":  # joins the process group, then never answers
    dist.init_process_group("gloo")
    time.sleep(8)
    sys.exit(0)
try:
    ParallelEnv.from_environment(timeout_s=30, preflight_timeout_s=2)
except RuntimeError as err:
    print("PREFLIGHT", err, flush=True)
    os._exit(0)
"""


def test_local_launch_runs_the_job_with_two_tasks(assets: dict, tmp_path: Path) -> None:
    config = base_config(assets, tmp_path / "runs", run={"name": "local", "root": str(tmp_path / "runs")})
    config["training"].update(max_steps=4, checkpoint={"every_steps": 4, "keep_last": 1})
    cfg = write_config(tmp_path / "cfg.yaml", config)
    done = keeltune("launch", str(cfg), "--local", "--gpus-per-node", "2", "--wait", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "local"
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert json.loads((run_dir / "jobs.json").read_text())[-1]["cluster"] == "local"
    status = keeltune("status", str(run_dir))
    assert "COMPLETED" in status.stdout and "step 4/4" in status.stdout
    assert "[rank1/" in keeltune("logs", str(run_dir), "--rank", "1").stdout


def test_launch_refuses_bad_configs_and_stale_data_before_submitting(
    assets: dict, ddp_run: SharedRun, tmp_path: Path
) -> None:
    config = base_config(assets, tmp_path / "runs", run={"name": "refused", "root": str(tmp_path / "runs")})
    typo = write_config(tmp_path / "typo.yaml", {**config, "trainig": {"lr": 1e-4}})
    done = keeltune("launch", str(typo), "--local")
    assert done.returncode == 2 and "did you mean training" in done.stderr
    # this config's sets prepared with the assets' tokenizer: the ones the session's ddp run prepared (the same
    # sources, seq_len and tokenizer), copied where `keeltune prepare` of this config would write them
    shutil.copytree(ddp_run.run_dir / "data", tmp_path / "runs" / "refused" / "data")
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the same tokenizer, but its files changed
        (other / name).write_text((Path(assets["model"]) / name).read_text() + "\n")
    config["model"]["tokenizer"] = str(other)
    done = keeltune("launch", str(write_config(tmp_path / "stale.yaml", config)), "--local")
    assert done.returncode == 2 and "prepared with other tokenizer files" in done.stderr, done.stderr
    assert not (tmp_path / "runs" / "refused" / "jobs.json").exists()  # nothing was submitted


def test_a_rank_that_never_answers_is_named_by_the_preflight(tmp_path: Path) -> None:
    script = tmp_path / "preflight.py"
    script.write_text(PREFLIGHT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("PREFLIGHT")), "")
    assert "rank 1 on" in line and "did not answer within 2 s" in line, done.stdout + done.stderr[-2000:]
