"""A trial is a keeltune run folder ``<root>/<sweep>/trial-NNNN/``: its config is the base config, the sweep's
``set:`` and ``slurm:``, then the trial's parameters; its objectives, constraints and intermediate values are
read from its metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeltune.config import Config, ConfigError, load_config
from keeltune.config.sweep import ParamConfig, SweepConfig, check_against_base, param_override
from keeltune.run_folder import METRICS_FILE


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def trial_dir(sweep: SweepConfig, number: int) -> Path:
    return sweep.folder / trial_name(number)


def base_overrides(sweep: SweepConfig) -> list[str]:
    """The sweep's ``set:`` and ``slurm:`` on the base config, and W&B's group (the sweep's name)."""
    return [
        *sweep.set,
        *(param_override(f"slurm.{key}", value) for key, value in sweep.slurm.items()),
        param_override("logging.wandb.group", sweep.name),
    ]


def trial_config(sweep: SweepConfig, number: int, params: dict[str, Any]) -> Config:
    """The resolved config of one trial."""
    overrides = [
        *base_overrides(sweep),
        *(param_override(key, value) for key, value in params.items()),
        param_override("run.root", str(sweep.folder)),
        param_override("run.name", trial_name(number)),
    ]
    if "job_name" not in sweep.slurm:  # squeue tells the sweeps' trials apart
        overrides.append(param_override("slurm.job_name", f"{sweep.name}-{trial_name(number)}"))
    return load_config(sweep.base, overrides)


def sample_values(param: ParamConfig) -> list[Any]:
    """The values a check tries: both ends of a range, every choice."""
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        return [int(param.low), int(param.high)]
    return [param.low, param.high]


def check_sweep(sweep: SweepConfig, sweep_file: Path, *, folder: bool = True) -> Config:
    """Everything that can be checked before a job is submitted: the base config with the sweep's overrides,
    every parameter at both ends of its range and at every choice, the metrics, the enqueued points and the
    sweep folder (when ``folder``). Returns the base config as trials see it (without parameters)."""
    try:
        base = load_config(sweep.base, base_overrides(sweep))
    except ConfigError as err:
        raise ConfigError(f"{sweep_file}: base {sweep.base}: {err}") from None
    for key, param in sweep.space.items():
        for value in sample_values(param):
            try:
                load_config(sweep.base, [*base_overrides(sweep), param_override(key, value)])
            except ConfigError as err:
                raise ConfigError(f"{sweep_file}: space.{key} = {value!r}: {err}") from None
    for i, point in enumerate(sweep.enqueue):
        for key, value in point.items():
            param = sweep.space[key]
            outside = (
                value not in param.choices
                if param.type == "categorical"
                else not isinstance(value, int | float) or not param.low <= value <= param.high
            )
            if outside:
                raise ConfigError(
                    f"{sweep_file}: enqueue.{i}.{key}: {value!r} is outside the parameter's space"
                )
    check_against_base(sweep, base, f"{sweep_file}: ")
    if folder:
        check_writable(sweep.folder, sweep_file)
    return base


def check_writable(folder: Path, sweep_file: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{sweep_file}: root: cannot write the sweep folder {folder} ({err.strerror}); choose a writable "
            "folder with root: DIR"
        ) from None


# --------------------------------------------------------------------------- reading a trial's metrics


def evals_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every record of metrics.jsonl merged per step (an eval and a training step share a step)."""
    path = run_dir / METRICS_FILE
    merged: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return merged
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        merged.setdefault(int(record.get("step", 0)), {}).update(record)
    return merged


@dataclass
class Outcome:
    """What a finished trial reports to the study: objective values and constraint violations (<= 0: met)
    at ``step``, or why it has none."""

    values: list[float] | None
    violations: list[float]
    step: int | None
    problem: str = ""


def trial_outcome(sweep: SweepConfig, run_dir: Path) -> Outcome:
    """The objectives at the declared step: the last eval logging the first objective (``objectives_at: last``)
    or the eval where it was best (``best``); every objective and constraint is read at that same step."""
    evals = evals_by_step(run_dir)
    first = sweep.objectives[0]
    steps = [s for s, r in sorted(evals.items()) if _finite(r.get(first.metric))]
    if not steps:
        return Outcome(None, [], None, f"no eval logged {first.metric} ({run_dir / METRICS_FILE})")
    if sweep.objectives_at == "last":
        step = steps[-1]
    else:
        pick = min if first.direction == "minimize" else max
        step = pick(steps, key=lambda s: evals[s][first.metric])
    results = evals[step]
    missing = [o.metric for o in sweep.objectives if not _finite(results.get(o.metric))]
    violations = constraint_violations(sweep, results)
    if missing:
        return Outcome(None, violations, step, f"step {step} logged no finite {', '.join(missing)}")
    return Outcome([float(results[o.metric]) for o in sweep.objectives], violations, step)


def constraint_violations(sweep: SweepConfig, results: dict[str, float]) -> list[float]:
    """Per constraint, how far it is broken (<= 0: met); a constraint on a metric this eval lacks is broken."""
    found = [c.violation(results) for c in sweep.parsed_constraints]
    return [1.0 if v is None else float(v) for v in found]


def intermediate_values(sweep: SweepConfig, run_dir: Path) -> dict[int, float]:
    """Per eval step, the pruning scalar: the pruning metric, plus ``constraint_penalty`` times the constraints'
    violations (signed so that larger is worse when minimizing)."""
    metric, direction = sweep.pruning_metric
    sign = 1.0 if direction == "minimize" else -1.0
    values = {}
    for step, results in sorted(evals_by_step(run_dir).items()):
        if not _finite(results.get(metric)) or step == 0:
            continue
        broken = sum(max(v, 0.0) for v in constraint_violations(sweep, results))
        values[step] = float(results[metric]) + sign * sweep.pruning.constraint_penalty * broken
    return values


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
