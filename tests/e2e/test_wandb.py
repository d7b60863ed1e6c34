"""W&B for real, offline: auto mode without a reachable host, one run id across a resume, no key anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import DDP_RUN_STEPS, SharedRun, base_config, keeltune, session_tasks, write_config

SENTINEL = "KEELTUNESENTINEL0123456789abcdef0123456789"  # 42 chars, shaped like a W&B key
NETRC_SENTINEL = "NETRCSENTINEL9876543210fedcba9876543210fe"


def test_auto_mode_goes_offline_resumes_the_same_run_and_never_writes_the_key(
    assets: dict, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine 127.0.0.1\n  login user\n  password {NETRC_SENTINEL}\n")
    (home / ".netrc").chmod(0o600)
    env = {**os.environ, "WANDB_API_KEY": SENTINEL, "HOME": str(home), "WANDB_BASE_URL": "http://127.0.0.1:9"}
    config = base_config(
        assets,
        tmp_path / "runs",
        training={"max_steps": 40, "warmup_steps": 2, "checkpoint": {"every_steps": 4, "keep_last": 1}},
        eval={
            "every_steps": 100,
            "micro_batch_size": 8,
            "tasks": [{**session_tasks(assets)[0], "every_steps": 0}],
        },
        logging={"wandb": {"mode": "auto", "project": "sentinel-test"}},
    )
    cfg = write_config(tmp_path / "cfg.yaml", config)
    run_dir = tmp_path / "runs" / "test"
    first = subprocess.Popen(
        [sys.executable, "-m", "keeltune.cli", "train", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step_0000004" / "trainer_state.json").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)  # the whole attempt dies, as when a node fails
    first_output = first.communicate()[0]
    second = keeltune("train", str(cfg), env=env)
    assert second.returncode == 0, second.stderr
    assert "upload it later with: wandb sync" in first_output + second.stderr

    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert all(
        p.name.endswith(f"-{run_id}") for p in offline_runs
    )  # the resumed attempt logs to the same run
    # the resumed attempt's records are in its file (the killed one lost what W&B had not flushed yet)
    assert b"train/loss" in (offline_runs[-1] / f"run-{run_id}.wandb").read_bytes()
    # the final eval's per-item results of the task as a W&B Table (its rows: the items' records)
    tables = list((offline_runs[-1] / "files" / "media" / "table").rglob("*.table.json"))
    assert len(tables) == 1 and "eval_items/cloze" in str(tables[0])
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 7 and {"gold", "loglikelihoods", "acc", "acc_norm"} <= set(table["columns"])

    written = [p for p in list(tmp_path.rglob("*")) if p.is_file() and p.name != ".netrc"]
    assert len(written) > 20
    for path in written:
        data = path.read_bytes()
        assert SENTINEL.encode() not in data, path
        assert NETRC_SENTINEL.encode() not in data, path
    for output in (first_output, second.stdout, second.stderr):
        assert SENTINEL not in output and NETRC_SENTINEL not in output


def test_disabled_mode_writes_no_wandb_folder(ddp_run: SharedRun) -> None:
    """The session's ddp run (tests/conftest.py) was trained with W&B disabled, the tests' default."""
    saved = yaml.safe_load((ddp_run.run_dir / "config.yaml").read_text())
    assert saved["logging"]["wandb"]["mode"] == "disabled"
    assert not (ddp_run.run_dir / "wandb").exists()
    assert (ddp_run.run_dir / "metrics.jsonl").read_text().count("train/loss") == DDP_RUN_STEPS
