"""``keeltune sweep`` on the real local Slurm cluster, one scenario: 6 trials, 2 in flight, study in a journal
file. A second driver refuses while the first runs; a trial's job cancelled is retried, cancelled again and
failed with its reason; a trial preempted (USR2) is requeued by Slurm and resumes inside the sweep; the driver is
SIGKILLed while a trial runs and another has finished, and a new driver process finishes the sweep without
running a finished trial again. The report's Pareto front equals the one derived here from the trials'
metrics.jsonl files, with ties on it and a non-dominated trial that breaks the constraint left off it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from tests.conftest import base_config, keeltune, train_losses, write_config
from tests.slurm.conftest import LocalSlurm, wait_for_step

pytestmark = pytest.mark.slurm

STEPS = 30
BOUND = 100.0  # forgetting_pct: lr 1e-2 forgets several hundred percent here, 3e-3 about 20
# trial order (enqueued): 0 is cancelled twice, 1 preempted; 2/3 and 4/5 differ only in the logging cadence,
# so they train identically and tie
POINTS = [(1e-2, 2), (1e-2, 1), (3e-3, 1), (3e-3, 2), (1e-4, 1), (1e-4, 2)]


def sweep_file(assets: dict, tmp_path: Path) -> Path:
    config = base_config(
        assets,
        tmp_path / "unused",
        training={"max_steps": STEPS, "warmup_steps": 1, "checkpoint": {"every_steps": 1000, "keep_last": 1}},
        eval={"every_steps": 10, "micro_batch_size": 8},
        data={"prepare_workers": 1, "loader_workers": 0},
    )
    write_config(tmp_path / "base.yaml", config)
    sweep = {
        "base": "base.yaml",
        "name": "slurm-sweep",
        "root": str(tmp_path / "sweeps"),
        "space": {
            "training.lr": {"choices": [1e-2, 3e-3, 1e-4]},
            "logging.every_steps": {"type": "int", "low": 1, "high": 2},
        },
        "enqueue": [{"training.lr": lr, "logging.every_steps": every} for lr, every in POINTS],
        "sampler": {"name": "random"},
        "objectives": [
            {"metric": "val/loss", "direction": "minimize"},
            {"metric": "retention/general/forgetting_pct", "direction": "minimize"},
        ],
        "constraints": [f"retention/*/forgetting_pct <= {BOUND}"],
        "budget": {"trials": len(POINTS)},
        "parallel": 2,
        "retries": 1,
        "poll_s": 0.5,
        "slurm": {"time": "10", "mem": "3000M", "env": ["OMP_NUM_THREADS=1"], "nodes": 1, "gpus_per_node": 1},
    }
    return write_config(tmp_path / "slurm-sweep.yaml", sweep)


def start_driver(path: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "keeltune.cli", "sweep", str(path)], stdout=out, stderr=subprocess.STDOUT
        )


def jobs(trial: Path) -> list[str]:
    path = trial / "jobs.json"
    return [r["job_id"] for r in json.loads(path.read_text())] if path.is_file() else []


def wait_until(what: str, check, timeout: float = 240, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}\n" + (log.read_text()[-3000:] if log else ""))


def load_study(folder: Path) -> optuna.Study:
    path = str(folder / "study.journal")
    storage = optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    return optuna.load_study(study_name="slurm-sweep", storage=storage)


def derived_front(trials: dict[int, Path]) -> tuple[set[int], dict[int, tuple[float, float]], set[int]]:
    """From metrics.jsonl alone: each finished trial's objectives at its last eval, the infeasible ones, and
    the front of the feasible ones (nothing dominates them; equal points both stay)."""
    values, infeasible = {}, set()
    for number, folder in trials.items():
        merged: dict[int, dict] = {}
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            merged.setdefault(record["step"], {}).update(record)
        last = max(s for s, r in merged.items() if "val/loss" in r)
        values[number] = (merged[last]["val/loss"], merged[last]["retention/general/forgetting_pct"])
        if values[number][1] > BOUND:
            infeasible.add(number)
    feasible = {n: v for n, v in values.items() if n not in infeasible}
    front = {
        n
        for n, v in feasible.items()
        if not any(o[0] <= v[0] and o[1] <= v[1] and o != v for m, o in feasible.items() if m != n)
    }
    return front, values, infeasible


def test_a_sweep_survives_a_cancelled_trial_a_preemption_and_a_killed_driver(
    slurm_cluster: LocalSlurm, assets: dict, tmp_path: Path
) -> None:
    path = sweep_file(assets, tmp_path)
    folder = tmp_path / "sweeps" / "slurm-sweep"
    trial = [folder / f"trial-{n:04d}" for n in range(len(POINTS))]
    first_log = tmp_path / "driver-1.log"
    driver = start_driver(path, first_log)
    try:
        job_a = wait_until("trial 0 submitted", lambda: jobs(trial[0]), log=first_log)[0]
        second = keeltune("sweep", str(path))  # a second driver on the same sweep refuses
        assert second.returncode == 2 and "already driven by pid" in second.stderr, second.stderr
        running = keeltune("sweep", "status", str(folder)).stdout
        assert f"driver: pid {driver.pid} on " in running and "trial-0000 │ running" in running, running

        # both first trials run side by side: hit each while it trains (a 30-step trial is over in seconds)
        preempted = wait_until("trial 1 submitted", lambda: jobs(trial[1]), log=first_log)[0]
        wait_for_step(trial[0], 2)
        slurm_cluster.run("scancel", job_a)
        wait_for_step(trial[1], 3)
        slurm_cluster.run("scancel", "--signal=USR2", preempted)  # what Slurm sends before a time limit
        slurm_cluster.release_requeued(int(preempted))
        job_b = wait_until("trial 0 retried", lambda: jobs(trial[0])[1:], log=first_log)[0]
        slurm_cluster.wait_for_state(int(job_b), {"RUNNING"}, timeout=120, source="squeue")
        slurm_cluster.run("scancel", job_b)

        def one_done_one_running() -> bool:
            states = [t.state.name for t in load_study(folder).get_trials()]
            running = [
                n for n, s in enumerate(states) if s == "RUNNING" and jobs(trial[n]) and n != 0 and
                slurm_cluster.squeue_state(int(jobs(trial[n])[-1])) == "RUNNING"
            ]  # fmt: skip
            return "COMPLETE" in states and bool(running)

        wait_until("a finished trial and a running one", one_done_one_running, timeout=300, log=first_log)
        running_at_kill = [
            n
            for n, t in enumerate(load_study(folder).get_trials())
            if t.state.name == "RUNNING" and jobs(trial[n])
        ]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert (folder / "study.journal").stat().st_size > 0

    second_log = tmp_path / "driver-2.log"
    restarted = start_driver(path, second_log)
    assert restarted.wait(timeout=600) == 0, second_log.read_text()[-3000:]
    study = load_study(folder)
    trials = study.get_trials()
    assert len(trials) == len(POINTS)  # the budget: the failed trial counts, its retry does not
    assert [t.state.name for t in trials] == ["FAIL"] + ["COMPLETE"] * 5, second_log.read_text()
    assert f"job {job_b} ended CANCELLED" in trials[0].user_attrs["failure"]
    assert "after 2 attempt(s)" in trials[0].user_attrs["failure"]
    assert jobs(trial[0]) == [job_a, job_b]
    for n in range(1, len(POINTS)):  # one job each: nothing ran twice, the running trials were reattached
        assert len(jobs(trial[n])) == 1, (n, jobs(trial[n]))
        assert max(train_losses(trial[n])) == STEPS
    assert running_at_kill and all(
        f"trial-{n:04d}: submitted" not in second_log.read_text() for n in running_at_kill
    )
    rank0 = (trial[1] / "logs" / "rank0.log").read_text()
    assert "received SIGUSR2" in rank0 and f"requeued job {preempted}" in rank0 and "resumed from" in rank0
    assert sorted(train_losses(trial[1])) == list(range(1, STEPS + 1))

    front, values, infeasible = derived_front({n: trial[n] for n in range(1, len(POINTS))})
    assert infeasible == {1} and not any(
        o[0] <= values[1][0] and o[1] <= values[1][1] and o != values[1] for o in values.values()
    )  # trial 1 is non-dominated but breaks the constraint
    assert values[2] == values[3] and values[4] == values[5] and front == {2, 3, 4, 5}  # ties stay on it
    reported = keeltune("sweep", "report", str(folder))
    assert reported.returncode == 0, reported.stderr
    written = {int(p.stem.removeprefix("trial-")) for p in (folder / "report" / "front").glob("*.yaml")}
    assert written == front
    status = keeltune("sweep", "status", str(folder)).stdout
    marked = {int(line.split()[1][6:]) for line in status.splitlines() if "trial-" in line and "│ *" in line}
    assert marked == front, status
    assert "infeasible" in next(line for line in status.splitlines() if "trial-0001" in line)
    assert "driver: no driver running" in status
