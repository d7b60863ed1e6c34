"""``keeltune sweep`` with ``--local`` trials and its study in a real PostgreSQL server (started on loopback):
a trial worse than the finished one at the same eval is pruned, stops at its next eval with a checkpoint and
fewer steps than max_steps; status and report read the study from the database."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import base_config, keeltune, train_losses, wandb_records, write_config
from tests.postgres import start_postgres

MAX_STEPS = 60
EVERY = 4


@pytest.fixture
def postgres(tmp_path: Path):
    server = start_postgres(tmp_path / "postgres")
    yield server
    server.stop()


def sweep_base(assets: dict, tmp_path: Path) -> Path:
    config = base_config(
        assets,
        tmp_path / "unused",
        training={
            "max_steps": MAX_STEPS,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": 1000, "keep_last": 1},
        },
        eval={"every_steps": EVERY, "micro_batch_size": 8},
        data={"prepare_workers": 1, "loader_workers": 0},
        logging={"wandb": {"mode": "offline", "project": "sweep-test"}},
    )
    return write_config(tmp_path / "base.yaml", config)


def test_a_postgresql_sweep_prunes_a_worse_trial_at_its_next_eval_with_a_checkpoint(
    assets: dict, tmp_path: Path, postgres
) -> None:
    base = sweep_base(assets, tmp_path)
    sweep = {
        "base": base.name,
        "name": "pg",
        "root": str(tmp_path / "sweeps"),
        "space": {"training.lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True}},
        "enqueue": [{"training.lr": 3e-3}, {"training.lr": 1e-6}],  # a good trial, then a far worse one
        "objectives": [
            {"metric": "val/loss", "direction": "minimize"},
            {"metric": "retention/general/forgetting_pct", "direction": "minimize"},
        ],
        "pruning": {"pruner": "median", "n_startup_trials": 1, "n_warmup_steps": EVERY},
        "budget": {"trials": 2},
        "parallel": 1,
        "storage": "env:KEELTUNE_TEST_SWEEP_DB",
        "poll_s": 0.2,
    }
    sweep_file = write_config(tmp_path / "pg.yaml", sweep)
    env = {"KEELTUNE_TEST_SWEEP_DB": postgres.url}
    done = keeltune("sweep", str(sweep_file), "--local", env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "sweeps" / "pg"
    assert not (folder / "study.journal").exists()  # the study is in the database
    study = optuna.load_study(study_name="pg", storage=postgres.url)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "PRUNED"], done.stdout
    assert study.get_trials()[0].params == {"training.lr": 3e-3}

    good, pruned = folder / "trial-0000", folder / "trial-0001"
    assert max(train_losses(good)) == MAX_STEPS
    decision = json.loads((pruned / "prune.json").read_text())
    stopped = max(train_losses(pruned))
    # the job saw the decision at its first eval after the driver wrote it (a race with that eval: 2 intervals)
    assert decision["step"] < stopped <= decision["step"] + 2 * EVERY and stopped < MAX_STEPS, decision
    assert stopped % EVERY == 0
    assert (pruned / "checkpoints" / f"step_{stopped:07d}").is_dir()
    assert "pruned by keeltune sweep: median pruner" in (pruned / "logs" / "rank0.log").read_text()
    assert f"trial-0001: pruned, stopped at step {stopped}" in done.stdout

    status = keeltune("sweep", "status", str(folder), env=env)
    assert status.returncode == 0, status.stderr
    lines = {line.split()[1]: line for line in status.stdout.splitlines() if "trial-000" in line}
    assert "complete" in lines["trial-0000"] and "*" in lines["trial-0000"], status.stdout
    assert "pruned" in lines["trial-0001"], status.stdout
    reported = keeltune("sweep", "report", "pg", "--root", str(tmp_path / "sweeps"), env=env)
    assert reported.returncode == 0, reported.stderr
    for trial in (good, pruned):  # W&B groups the trials under the sweep's name
        run_id = (trial / "wandb_run_id").read_text()
        (run_file,) = (trial / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
        runs = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
        assert runs[0].run_group == "pg" and runs[0].display_name == trial.name
    (summary,) = (folder / "report" / "wandb").glob("offline-run-*-pg-summary/run-pg-summary.wandb")
    runs = [r.run for r in wandb_records(summary) if r.WhichOneof("record_type") == "run"]
    assert (runs[0].run_group, runs[0].job_type) == ("pg", "sweep-summary")
    (table_file,) = (summary.parent / "files" / "media" / "table" / "sweep").glob("trials_*.table.json")
    assert list((summary.parent / "files" / "media" / "images" / "sweep").glob("pareto_front_*.png"))
    cells = json.loads(table_file.read_text())["data"]
    assert [c[0] for c in cells] == ["trial-0000", "trial-0001"] and cells[0][-1] == "*"
    front = yaml.safe_load((folder / "report" / "front" / "trial-0000.yaml").read_text())
    assert front["training"]["lr"] == 3e-3 and front["run"]["name"] == "pg-trial-0000"
    assert (folder / "report" / "pareto_front.png").stat().st_size > 10_000
