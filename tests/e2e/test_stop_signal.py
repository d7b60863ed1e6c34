"""A stop signal checkpoints first and never depends on W&B: SIGTERM with W&B offline and its close made to fail
ends in a checkpoint at the step reached, exit code 3, the signal named as the cause; the resume continues from
it, and W&B's charts continue on the run's own step. W&B failures are logged, never raised."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keeltune.config import WandbConfig
from keeltune.training.metrics import STEP_METRIC, MetricsLogger, resolve_wandb_mode
from tests.conftest import base_config, keeltune, read_metrics, train_losses, wandb_history, write_config
from tests.processes import live_processes, start_training

STEPS = 30
CLOSE_FAILS = """
import wandb.sdk.wandb_run as wandb_run

def finish(self, *args, **kwargs):
    raise ConnectionResetError("Connection lost")

wandb_run.Run.finish = finish
"""


def test_sigterm_checkpoints_at_the_step_reached_although_w_and_b_fails_to_close(
    assets: dict, tmp_path: Path
) -> None:
    config = base_config(
        assets,
        tmp_path / "runs",
        training={"max_steps": STEPS, "warmup_steps": 2, "checkpoint": {"every_steps": 1000, "keep_last": 1}},
        eval={"every_steps": 1000, "micro_batch_size": 8},
        logging={"wandb": {"mode": "offline", "project": "stop-test"}},
    )
    cfg = write_config(tmp_path / "cfg.yaml", config)
    run_dir = tmp_path / "runs" / "test"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CLOSE_FAILS)
    process = subprocess.Popen(
        [sys.executable, "-m", "keeltune.cli", "train", str(cfg)],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "inject")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 3, stderr[-3000:]  # stopped cleanly after checkpointing
    with contextlib.suppress(ProcessLookupError):  # what W&B left running, as the end of a job step would
        os.killpg(process.pid, signal.SIGKILL)
    reached = max(train_losses(run_dir))
    assert reached < STEPS
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{reached:07d}"]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "received SIGTERM: stopping at the next step boundary to checkpoint" in log
    assert f"stopped at step {reached} after checkpointing (received SIGTERM)" in log
    assert "W&B did not close cleanly (ConnectionResetError: Connection lost)" in log
    assert "Traceback" not in stderr and "failed" not in log
    record = json.loads((run_dir / "logs" / "rank0.json").read_text())
    assert record["outcome"] == "stopped" and record["detail"] == "received SIGTERM"

    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{reached:07d}'}" in resumed.stderr
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    run_id = (run_dir / "wandb_run_id").read_text()
    attempts = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2
    second = [row for row in wandb_history(attempts[1] / f"run-{run_id}.wandb") if "train/loss" in row]
    # the resumed curve continues at the run's own step (W&B's internal step restarts in each offline file)
    assert [int(row[STEP_METRIC]) for row in second] == list(range(reached + 1, STEPS + 1))


def test_w_and_b_failures_are_logged_and_metrics_jsonl_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb.sdk.wandb_run as wandb_run

    def broken(*args, **kwargs):
        raise ConnectionResetError("Connection lost")

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # W&B publishes its service there: undone after
    logger = MetricsLogger(
        tmp_path, WandbConfig(mode="offline"), enabled=True, run_config={"run": {"name": "w"}}
    )
    assert logger.wandb_run is not None
    logger.log(1, {"train/loss": 2.0})
    monkeypatch.setattr(wandb_run.Run, "log", broken)
    monkeypatch.setattr(wandb_run.Run, "finish", broken)
    with caplog.at_level(logging.WARNING, logger="keeltune"):
        logger.log(2, {"train/loss": 1.5})  # W&B's service is gone: logged once, then left aside
        logger.log(3, {"train/loss": 1.0})
        logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("W&B stopped working (ConnectionResetError: Connection lost)" in w for w in warnings) == 1
    assert logger.wandb_run is None


def test_auto_mode_says_why_it_went_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    mode, why = resolve_wandb_mode("auto")
    assert mode == "offline" and "no W&B key found (WANDB_API_KEY, or a ~/.netrc entry for 127.0.0.1)" in why
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    mode, why = resolve_wandb_mode("auto")  # the tests' W&B host is a closed local port
    assert mode == "offline" and "the W&B host 127.0.0.1:9 did not answer within 2 s" in why
    assert resolve_wandb_mode("offline") == ("offline", "")


def test_ranks_whose_launcher_is_killed_checkpoint_and_end_instead_of_training_on(
    assets: dict, tmp_path: Path
) -> None:
    """torch's launcher starts each rank in a session of its own: killing the launcher outright (SIGKILL to the
    CLI's process group) must not leave orphaned ranks training into the run folder. They get SIGTERM from the
    kernel (parent-death signal), checkpoint at the step reached, and end."""
    config = base_config(
        assets,
        tmp_path / "runs",
        training={"max_steps": 400, "warmup_steps": 2, "checkpoint": {"every_steps": 1000, "keep_last": 1}},
        eval={"every_steps": 1000, "micro_batch_size": 8},
    )
    config["data"]["prepare_workers"] = 1
    cfg = write_config(tmp_path / "cfg.yaml", config)
    run_dir = tmp_path / "runs" / "test"
    process = start_training(cfg, 2)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.01)
    ranks = live_processes("keeltune.launcher.entry", str(run_dir))
    assert len(ranks) == 2, ranks
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and torch's launcher; the ranks are in other sessions
    process.wait()
    deadline = time.monotonic() + 60
    while live_processes("keeltune.launcher.entry", str(run_dir)):
        assert time.monotonic() < deadline, (
            "orphaned ranks still running 60 s after their launcher was killed"
        )
        time.sleep(0.1)
    reached = max(train_losses(run_dir))
    assert reached < 400 and not (run_dir / "final").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{reached:07d}"]
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "received SIGTERM: stopping at the next step boundary to checkpoint" in log, log[-2000:]
        record = json.loads((run_dir / "logs" / f"rank{rank}.json").read_text())
        assert (record["outcome"], record["step"]) == ("stopped", reached), record
