"""``keeltune sweep SWEEP.yaml``: the driver on the login node (no torch). It keeps ``parallel`` trials in
flight, each a keeltune run submitted like ``keeltune launch`` (Slurm, or this machine with ``--local``), and
records each finished trial from its run folder. All its state is the study (journal file or database) and the
trial folders, so it may be killed at any time and started again: it reattaches to trials still queued or
running, records those that ended meanwhile, resubmits a trial whose job failed (``retries``, resuming from its
checkpoint) and never runs a finished trial again. One driver per sweep: a second one refuses while the first
is alive (``driver.lock``: its host, pid and a heartbeat; a lock whose process is gone, or whose heartbeat is
older than ``STALE_AFTER_POLLS`` polls, is taken over)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from keeltune.atomic import write_atomically, write_json_atomically
from keeltune.config import ConfigError, check_world_size
from keeltune.config.sweep import SweepConfig
from keeltune.launcher import submit
from keeltune.launcher.run_dir import prepare_run_dir
from keeltune.run_folder import CONFIG_FILE, FINAL_MODEL_DIR, PRUNE_FILE
from keeltune.sweep.study import (
    FAILURE_ATTR,
    PARTNER_ATTR,
    STARTED_ATTR,
    STEP_ATTR,
    describe_storage,
    open_studies,
    record_constraints,
    suggest,
)
from keeltune.sweep.trials import (
    evals_by_step,
    intermediate_values,
    trial_config,
    trial_dir,
    trial_name,
    trial_outcome,
)

LOCK_FILE = "driver.lock"
SWEEP_FILE = "sweep.yaml"  # in the sweep folder: the sweep as first started (a restart must match it)
STALE_AFTER_POLLS = 4
TAKEOVER_SETTLE_S = 0.5  # a driver taking over a dead one's lock reads it back after this long
# what a restart may change; the rest (space, objectives, sampler, ...) would make the study inconsistent
RESTART_MUTABLE = ("budget", "parallel", "retries", "poll_s", "slurm")


class DriverLock:
    """``driver.lock`` in the sweep folder: which driver owns the sweep, refreshed at every poll."""

    def __init__(self, folder: Path, poll_s: float) -> None:
        self.path = folder / LOCK_FILE
        self.poll_s = poll_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def acquire(self) -> None:
        """Take the lock, or raise naming the live driver that holds it."""
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and self._alive(holder):
                raise ConfigError(
                    f"sweep {self.path.parent.name} is already driven by pid {holder['pid']} on {holder['host']} "
                    f"(heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s ago, {self.path}); watch it with "
                    "keeltune sweep status, or stop that driver first"
                ) from None
            self.refresh()  # the holder is gone: take over, unless another driver took over at the same time
            time.sleep(TAKEOVER_SETTLE_S)
            holder = self._holder()
            if holder is None or {k: holder.get(k) for k in self.me} != self.me:
                raise ConfigError(
                    f"sweep {self.path.parent.name}: another driver took it over just now ({self.path})"
                ) from None
            return
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps({**self.me, "heartbeat": time.time()}))

    def refresh(self) -> None:
        write_json_atomically(self.path, {**self.me, "heartbeat": time.time()})

    def describe(self) -> str:
        """Who drives the sweep, for ``keeltune sweep status``."""
        holder = self._holder()
        if holder is None:
            return "no driver running (start or restart it with keeltune sweep SWEEP.yaml)"
        age = time.time() - float(holder.get("heartbeat", 0))
        if not self._alive(holder):
            return (
                f"no driver running (the last one, pid {holder.get('pid')} on {holder.get('host')}, stopped "
                f"{age:.0f} s ago; restart it with keeltune sweep SWEEP.yaml)"
            )
        return f"pid {holder['pid']} on {holder['host']}, heartbeat {age:.0f} s ago"

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and {k: holder.get(k) for k in self.me} == self.me:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _alive(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == self.me["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except (ProcessLookupError, ValueError, KeyError):
                return False
            except PermissionError:
                return True
            return _not_zombie(int(holder["pid"]))
        return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_POLLS * self.poll_s + 60


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def sweep_record(sweep: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(sweep)))


def check_restart(sweep: SweepConfig) -> None:
    """A restarted sweep must search what it searched: only ``RESTART_MUTABLE`` keys may change."""
    saved_file = sweep.folder / SWEEP_FILE
    if not saved_file.is_file():
        return
    saved, now = yaml.safe_load(saved_file.read_text()), sweep_record(sweep)
    changed = [k for k in now if k not in RESTART_MUTABLE and saved.get(k) != now[k]]
    if changed:
        raise ConfigError(
            f"sweep {sweep.name} was started with another {', '.join(changed)} ({saved_file}); a restart may "
            f"change only {', '.join(RESTART_MUTABLE)}. Restore them, or start a new sweep under another name"
        )


class Driver:
    """One pass of ``step`` tends every running trial and starts new ones; ``run`` loops until done."""

    def __init__(self, sweep: SweepConfig, *, local: bool, say: Callable[[str], None] = print) -> None:
        self.sweep = sweep
        self.local = local
        self.say = say
        self.study, self.pruning = open_studies(sweep, create=True)
        if STARTED_ATTR not in self.study.user_attrs:
            self.study.set_user_attr(STARTED_ATTR, time.time())
            for point in sweep.enqueue:  # the points to try first, once
                self.study.enqueue_trial(point, skip_if_exists=True)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, int]:
        lock = DriverLock(self.sweep.folder, self.sweep.poll_s)
        lock.acquire()
        write_atomically(
            self.sweep.folder / SWEEP_FILE, yaml.safe_dump(sweep_record(self.sweep), sort_keys=False)
        )
        self.say(
            f"sweep {self.sweep.name}: study in {describe_storage(self.sweep)}, trials in {self.sweep.folder}"
        )
        try:
            while self.step():
                lock.refresh()
                time.sleep(self.sweep.poll_s)
        finally:
            lock.release()
        counts = self.counts()
        self.say(
            f"sweep {self.sweep.name} done: "
            + ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)
            + f"; see keeltune sweep status {self.sweep.folder}"
        )
        return counts

    def step(self) -> bool:
        """Tend the running trials, start new ones; False once nothing runs and the budget is spent."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if trial.state == TrialState.RUNNING:
                self.tend(trial)
        while self.may_start() and self.in_flight() < self.sweep.parallel:
            self.start_trial()
        return self.in_flight() > 0 or self.may_start()

    def in_flight(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def may_start(self) -> bool:
        budget = self.sweep.budget
        started = self.study.get_trials(
            deepcopy=False, states=tuple(s for s in TrialState if s != TrialState.WAITING)
        )
        limits = [n for n in (budget.trials, self.sweep.grid_size) if n is not None]
        if limits and len(started) >= min(limits):
            return False
        minutes = budget.wall_minutes
        return minutes is None or time.time() - self.study.user_attrs[STARTED_ATTR] < 60 * minutes

    def counts(self) -> dict[str, int]:
        counts = {
            s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        }
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state.name in counts:
                counts[trial.state.name] += 1
        return counts

    # ------------------------------------------------------------------ one trial

    def start_trial(self) -> None:
        trial = self.study.ask()
        self.submit(self.study.get_trials(deepcopy=False)[trial.number])

    def submit(self, trial: optuna.trial.FrozenTrial) -> None:
        """Submit the trial's run folder (new, or resumed from its checkpoint); a config a trial's parameters
        make impossible fails the trial at once, with the reason. Its parameters are suggested here (again
        after a restart: Optuna keeps those already given and samples any the driver did not get to)."""
        name = trial_name(trial.number)
        self._partner(trial)
        params = suggest(_live(self.study, trial), self.sweep)
        try:
            config = trial_config(self.sweep, trial.number, params)
            check_world_size(config, config.slurm.world_size)
            run_dir, checkpoint = prepare_run_dir(config, config.slurm.world_size)
            record, _ = submit.submit(config, run_dir, local=self.local)
        except ConfigError as err:
            self.fail(trial, f"its config is impossible: {err}")
            return
        where = f"resuming from {checkpoint.name}" if checkpoint else "new"
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.say(f"{name}: submitted job {record.job_id} ({record.cluster}, {where}): {shown}")

    def tend(self, trial: optuna.trial.FrozenTrial) -> None:
        """Reattach to a running trial: report its evals, record it once its job ended, or resubmit it."""
        folder = trial_dir(self.sweep, trial.number)
        records = submit.read_records(folder)
        if not records:  # asked, but the driver died before the submission
            self.submit(trial)
            return
        record = records[-1]
        state = submit.job_state(record)
        if not _ended(record, state["state"]):
            self.report(trial, folder)
            return
        if (folder / FINAL_MODEL_DIR / "config.json").is_file():
            self.finish(trial, folder)
            return
        reason = f"job {record.job_id} ended {state['state']}" + (
            f" (exit {state['exit']})" if state.get("exit") not in ("", None, "0:0") else ""
        )
        dead = submit.dead_ranks(record)
        if dead:
            reason += "; " + "; ".join(dead)
        if len(records) <= self.sweep.retries:
            self.say(f"{trial_name(trial.number)}: {reason}; retry {len(records)} of {self.sweep.retries}")
            self.submit(trial)
        else:
            self.fail(trial, f"{reason}, after {len(records)} attempt(s)")

    def report(self, trial: optuna.trial.FrozenTrial, folder: Path) -> None:
        """Give the pruner the trial's new evals; when it says prune, tell the job through its run folder."""
        if self.sweep.pruning.pruner == "none" or (folder / PRUNE_FILE).is_file():
            return
        partner = self._partner(trial)
        seen = partner.last_step if partner.last_step is not None else -1
        reported = False
        live = _live(self.pruning, partner)
        for step, value in intermediate_values(self.sweep, folder).items():
            if step > seen:
                live.report(value, step)
                seen, reported = step, True
        if reported and live.should_prune():
            metric = self.sweep.pruning_metric[0]
            why = f"{self.sweep.pruning.pruner} pruner at step {seen} ({metric} scalar {value:.4g})"
            write_json_atomically(folder / PRUNE_FILE, {"step": seen, "reason": why})
            self.say(f"{trial_name(trial.number)}: pruned: {why}; it stops at its next eval")

    def finish(self, trial: optuna.trial.FrozenTrial, folder: Path) -> None:
        outcome = trial_outcome(self.sweep, folder)
        live = _live(self.study, trial)
        record_constraints(live, self.sweep, outcome.violations)
        live.set_user_attr(STEP_ATTR, outcome.step)
        partner = self._partner(trial)
        name = trial_name(trial.number)
        stopped, max_steps = _last_step(folder), trial_config_steps(folder)
        if (folder / PRUNE_FILE).is_file() and stopped < max_steps:
            self.study.tell(trial.number, state=TrialState.PRUNED)
            self.pruning.tell(partner.number, state=TrialState.PRUNED)
            self.say(f"{name}: pruned, stopped at step {stopped} of {max_steps}")
            return
        if outcome.values is None:
            self.fail(trial, outcome.problem)
            return
        self.study.tell(trial.number, outcome.values)
        scalars = intermediate_values(self.sweep, folder)
        if scalars:
            self.pruning.tell(partner.number, scalars[max(scalars)])
        else:
            self.pruning.tell(partner.number, state=TrialState.FAIL)
        shown = ", ".join(
            f"{o.metric} {v:.4g}" for o, v in zip(self.sweep.objectives, outcome.values, strict=True)
        )
        self.say(f"{name}: finished at step {outcome.step}: {shown}")

    def fail(self, trial: optuna.trial.FrozenTrial, reason: str) -> None:
        _live(self.study, trial).set_user_attr(FAILURE_ATTR, reason)
        self.study.tell(trial.number, state=TrialState.FAIL)
        if PARTNER_ATTR in trial.user_attrs:
            self.pruning.tell(self._partner(trial).number, state=TrialState.FAIL)
        self.say(f"{trial_name(trial.number)}: failed: {reason}")

    def _partner(self, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        """The trial's partner in the pruning study, asked when the trial is first submitted."""
        number = trial.user_attrs.get(PARTNER_ATTR)
        if number is None:
            number = self.pruning.ask().number
            _live(self.study, trial).set_user_attr(PARTNER_ATTR, number)
        return self.pruning.get_trials(deepcopy=False)[number]


def _live(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A running trial, reopened (after a restart too) to report values or set attributes."""
    return optuna.Trial(study, trial._trial_id)


def _ended(record: submit.JobRecord, state: str) -> bool:
    """Whether the trial's job is over: an ended state (a local job: its processes are gone); a preempted
    Slurm job is over only once it left the queue (Slurm may requeue it)."""
    if record.cluster == "local":
        return state in submit.ENDED_STATES or state == "UNKNOWN"
    if state not in submit.ENDED_STATES:
        return False
    return state != "PREEMPTED" or not submit.in_queue(record.job_id)


def _last_step(folder: Path) -> int:
    """The last step the trial logged (a training step or an eval)."""
    return max(evals_by_step(folder), default=0)


def trial_config_steps(folder: Path) -> int:
    saved = yaml.safe_load((folder / CONFIG_FILE).read_text())
    stages = saved.get("stages") or [saved]
    return sum(int(stage["training"]["max_steps"]) for stage in stages)
