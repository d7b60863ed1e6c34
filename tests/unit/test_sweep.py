"""The sweep file's checks (every bad input refused before a job is submitted, naming the key), objectives and
constraints read from a trial's metrics.jsonl, the Pareto front, the driver's lock and restart rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from keeltune.config import ConfigError
from keeltune.config.loader import load_sweep
from keeltune.sweep.driver import DriverLock, check_restart, sweep_record
from keeltune.sweep.report import TrialRow, pareto_front
from keeltune.sweep.trials import check_sweep, intermediate_values, trial_config, trial_outcome


def write_base(folder: Path) -> Path:
    config = {
        "model": {"path": str(folder / "model")},
        "data": {
            "train": [{"name": "task", "path": str(folder / "task.jsonl"), "format": "instruction"}],
            "validation": {"name": "task", "path": str(folder / "val.jsonl"), "format": "instruction"},
            "retention": [{"name": "general", "path": str(folder / "general.jsonl")}],
        },
        "training": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 2},
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_dict(folder: Path, **changes: Any) -> dict[str, Any]:
    sweep = {
        "base": "base.yaml",
        "root": str(folder / "sweeps"),
        "space": {
            "training.lr": {"low": 1e-5, "high": 1e-3, "log": True},
            "regularization.kl.weight": {"choices": [0.1, 0.5]},
        },
        "objectives": [{"metric": "val/loss"}, {"metric": "retention/general/forgetting_pct"}],
        "constraints": ["retention/*/forgetting_pct <= 10"],
        "budget": {"trials": 4},
    }
    sweep.update(changes)
    return sweep


def load(folder: Path, sweep: dict[str, Any]):
    write_base(folder)
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    loaded = load_sweep(path)
    check_sweep(loaded, path)
    return loaded


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"space": {"training.lrr": {"low": 1e-5, "high": 1e-3}}}, "training.lrr: unknown key (did you mean training.lr?)"),
        ({"space": {"training.lr": {"low": 1e-3, "high": 1e-5}}}, "space.training.lr.low: 0.001 is above high 1e-05"),
        ({"space": {"training.lr": {"low": 0, "high": 1e-3, "log": True}}}, "a log range must stay above 0"),
        ({"space": {"training.lr": {"choices": [1e-3]}}}, "needs at least two choices"),
        ({"objectives": [{"metric": "val/los"}]}, "objectives.0.metric: no trial would log 'val/los' (did you mean 'val/loss'?)"),
        ({"constraints": ["retention/wiki/forgetting_pct <= 5"]}, "constraints.0: no trial would log 'retention/wiki/forgetting_pct'"),
        ({"constraints": ["val/loss < 5"]}, "constraints.0: 'val/loss < 5' must read METRIC <= NUMBER"),
        ({"budget": {"trials": 0}}, "budget.trials: must be >= 1, got 0"),
        ({"budget": {}}, "give a budget"),
        ({"budget": {"wall_time": "soon"}}, "wall_time: 'soon' is not a time"),
        ({"space": {"training.micro_batch_size": {"type": "int", "low": 2, "high": 16}}}, "space.training.micro_batch_size = 16"),
        ({"sampler": {"name": "grid"}}, "grid sampler needs categorical choices or an int range"),
        ({"space": {"training.lr": {"low": 1e-5, "high": 1e-3, "when": "regularization.kl.weight=0.1"}}}, "must be a categorical parameter listed before it"),
        ({"enqueue": [{"training.lr": 1.0}]}, "enqueue.0.training.lr: 1.0 is outside the parameter's space"),
        ({"parallel": 0}, "parallel: must be >= 1"),
        ({"pruning": {"pruner": "median", "metric": "val/acc"}}, "pruning.metric: no trial would log 'val/acc'"),
    ],
)  # fmt: skip
def test_a_bad_sweep_file_is_refused_with_the_key_and_what_to_do(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, sweep_dict(tmp_path, **change))
    assert expected in str(err.value)
    assert not any((tmp_path / "sweeps").glob("*/trial-*"))


def test_an_unwritable_sweep_folder_is_refused_before_anything_runs(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere: a file where the folder should be fails for everyone
        (tmp_path / "sweeps").write_text("")
    else:
        (tmp_path / "sweeps").mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"root: cannot write the sweep folder .*choose a writable folder"):
        load(tmp_path, sweep_dict(tmp_path))


def test_the_cli_refuses_a_bad_sweep_with_exit_2_before_submitting(tmp_path: Path) -> None:
    write_base(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(tmp_path, budget={"trials": 0})))
    done = subprocess.run(
        [sys.executable, "-m", "keeltune.cli", "sweep", str(path), "--local"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and f"{path}:" in done.stderr and "budget.trials: must be >= 1" in done.stderr
    assert not (tmp_path / "sweeps" / "bad").exists()


def test_a_trial_config_is_the_base_with_the_sweeps_overrides_and_its_parameters(tmp_path: Path) -> None:
    sweep = load(
        tmp_path, sweep_dict(tmp_path, set=["training.max_steps=20"], slurm={"time": "30", "nodes": 2})
    )
    config = trial_config(sweep, 7, {"training.lr": 3e-4, "regularization.kl.weight": 0.5})
    assert (config.training.lr, config.regularization.kl.weight, config.training.max_steps) == (3e-4, 0.5, 20)
    assert (config.slurm.time, config.slurm.nodes) == ("30", 2)
    assert config.run_dir == tmp_path / "sweeps" / "s" / "trial-0007"
    assert config.logging.wandb.group == "s" and config.slurm.job_name == "s-trial-0007"


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_objectives_are_read_at_the_last_or_the_best_eval_and_constraints_at_the_same_step(
    tmp_path: Path,
) -> None:
    records = [
        {"step": 0, "val/loss": 5.0, "retention/general/forgetting_pct": 0.0},
        {"step": 5, "train/loss": 3.0},
        {"step": 5, "val/loss": 3.0, "retention/general/forgetting_pct": 4.0},
        {"step": 10, "val/loss": 3.5, "retention/general/forgetting_pct": 12.0},
    ]
    write_metrics(tmp_path / "run", records)
    last = trial_outcome(load(tmp_path, sweep_dict(tmp_path)), tmp_path / "run")
    assert (last.values, last.violations, last.step) == ([3.5, 12.0], [2.0], 10)
    best = trial_outcome(load(tmp_path, sweep_dict(tmp_path, objectives_at="best")), tmp_path / "run")
    assert (best.values, best.violations, best.step) == ([3.0, 4.0], [-6.0], 5)
    write_metrics(tmp_path / "empty", [{"step": 1, "train/loss": 3.0}])
    assert (
        "no eval logged val/loss"
        in trial_outcome(load(tmp_path, sweep_dict(tmp_path)), tmp_path / "empty").problem
    )


def test_the_pruning_scalar_adds_the_penalty_for_broken_constraints(tmp_path: Path) -> None:
    write_metrics(
        tmp_path / "run",
        [
            {"step": 0, "val/loss": 5.0, "retention/general/forgetting_pct": 0.0},
            {"step": 5, "val/loss": 3.0, "retention/general/forgetting_pct": 4.0},
            {"step": 10, "val/loss": 2.5, "retention/general/forgetting_pct": 13.0},
        ],
    )
    sweep = load(tmp_path, sweep_dict(tmp_path, pruning={"pruner": "median", "constraint_penalty": 0.5}))
    assert intermediate_values(sweep, tmp_path / "run") == {5: 3.0, 10: 2.5 + 0.5 * 3.0}


def row(
    number: int, values: list[float] | None, violations: list[float], state: str = "complete"
) -> TrialRow:
    return TrialRow(number, state, "", 1, {}, values, violations, 10, "")


def test_the_front_keeps_ties_and_leaves_out_infeasible_and_unfinished_trials() -> None:
    rows = [
        row(0, [1.0, 9.0], [-1.0]),
        row(1, [1.0, 9.0], [-1.0]),  # ties trial 0: both stay
        row(2, [0.5, 20.0], [10.0]),  # non-dominated, but breaks the constraint
        row(3, [2.0, 8.0], [-2.0]),
        row(4, [2.0, 9.5], [-0.5]),  # dominated by 3
        row(5, None, [], "failed"),
        row(6, [0.1, 0.1], [-1.0], "pruned"),
    ]
    front = pareto_front(rows, ["minimize", "minimize"])
    assert [r.number for r in front] == [0, 1, 3]
    assert [r.number for r in pareto_front(rows, ["minimize", "maximize"])] == [0, 1, 4]


def test_a_second_driver_refuses_while_the_first_lives_and_takes_over_a_dead_ones_lock(
    tmp_path: Path,
) -> None:
    first = DriverLock(tmp_path, poll_s=1)
    assert first.describe().startswith("no driver running")
    first.acquire()
    assert first.describe().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(ConfigError, match=rf"already driven by pid {os.getpid()}"):
        DriverLock(tmp_path, poll_s=1).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "driver.lock").write_text(json.dumps({**first.me, "pid": dead.pid, "heartbeat": 0}))
    second = DriverLock(tmp_path, poll_s=1)
    assert f"the last one, pid {dead.pid}" in second.describe()
    second.acquire()  # the holder is gone
    assert json.loads((tmp_path / "driver.lock").read_text())["pid"] == os.getpid()
    (tmp_path / "driver.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": 0}))
    DriverLock(tmp_path, poll_s=1).acquire()  # another host's driver whose heartbeat is stale


def test_a_restart_may_change_the_budget_but_not_the_space(tmp_path: Path) -> None:
    sweep = load(tmp_path, sweep_dict(tmp_path))
    (sweep.folder / "sweep.yaml").write_text(yaml.safe_dump(sweep_record(sweep)))
    check_restart(load(tmp_path, sweep_dict(tmp_path, budget={"trials": 9}, parallel=3)))
    wider = sweep_dict(tmp_path)
    wider["space"]["training.lr"]["high"] = 1e-2
    with pytest.raises(ConfigError, match="started with another space"):
        check_restart(load(tmp_path, wider))


@pytest.mark.parametrize("sampler", ["grid", "random", "tpe", "nsga2", "gp"])
def test_every_sampler_asks_conditional_parameters_and_learns_from_constraints(
    tmp_path: Path, sampler: str
) -> None:
    from keeltune.sweep.driver import Driver
    from keeltune.sweep.study import record_constraints, suggest

    space = {
        "regularization.kl.weight": {"choices": [0.0, 0.5]},
        "training.lr": {"choices": [1e-4, 1e-3]},
        "regularization.l2sp.weight": {"choices": [0.01, 0.1], "when": "regularization.kl.weight=0.5"},
    }
    if sampler == "grid":
        del space["regularization.l2sp.weight"]  # the grid sampler refuses conditional parameters
    sweep = load(
        tmp_path,
        sweep_dict(
            tmp_path, space=space, sampler={"name": sampler, "n_startup_trials": 2}, budget={"trials": 6}
        ),
    )
    driver = Driver(sweep, local=True, say=lambda _: None)
    for i in range(5 if sampler != "grid" else 4):
        assert driver.may_start()
        trial = driver.study.ask()
        params = suggest(trial, sweep)
        conditional = "regularization.l2sp.weight" in space and params["regularization.kl.weight"] == 0.5
        assert ("regularization.l2sp.weight" in params) == conditional
        record_constraints(trial, sweep, [float(i % 2)])
        driver.study.tell(trial, [float(i), float(5 - i)])
    assert driver.may_start() == (sampler != "grid")  # the grid's 4 points are done
    trials = driver.study.get_trials()
    assert [t.system_attrs["constraints:0: retention/*/forgetting_pct <= 10"] for t in trials] == [
        float(i % 2) for i in range(len(trials))
    ]
    if sampler == "grid":
        assert len({tuple(t.params.values()) for t in trials}) == 4


def test_a_database_that_does_not_answer_is_named_without_its_password(tmp_path: Path, monkeypatch) -> None:
    from keeltune.sweep.study import storage_for

    monkeypatch.setenv("SWEEP_DB", "postgresql+psycopg2://user:s3cret@127.0.0.1:1/db")
    sweep = load(tmp_path, sweep_dict(tmp_path, storage="env:SWEEP_DB"))
    with pytest.raises(ConfigError) as err:
        storage_for(sweep)
    assert "postgresql+psycopg2://user:***@127.0.0.1:1/db" in str(err.value) and "s3cret" not in str(
        err.value
    )
    monkeypatch.delenv("SWEEP_DB")
    with pytest.raises(ConfigError, match="names the environment variable SWEEP_DB, which is unset"):
        storage_for(sweep)
