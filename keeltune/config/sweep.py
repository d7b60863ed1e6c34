"""The sweep file of ``keeltune sweep``: a base config, a search space over its keys, objectives, constraints,
sampler, pruning, budget and per-trial resources. Each section checks itself; ``check_sweep`` checks the whole
against the base config (every key, every metric) before any job is submitted."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from keeltune.config.errors import ConfigError
from keeltune.config.schema import FORGETTING_STATS, Config, available_metrics, timeout_minutes

PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("grid", "random", "tpe", "nsga2", "gp")
MULTI_OBJECTIVE_SAMPLERS = ("grid", "random", "tpe", "nsga2", "gp")
TRAIN_METRICS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/epoch")
_CONSTRAINT = re.compile(r"\s*(\S+)\s*(<=|>=)\s*(\S+)\s*$")
_WHEN = re.compile(r"\s*([\w.]+)\s*=\s*(.+?)\s*$")


@dataclass(kw_only=True)
class ParamConfig:
    """One searched config key: a float or int range (``log`` for a log scale; ``step`` for a grid of an int
    range) or categorical ``choices``; ``when: OTHER=VALUE`` samples it only when the earlier categorical
    parameter OTHER took VALUE (otherwise the base config's value stays)."""

    type: Literal["float", "int", "categorical"] | None = (
        None  # default: categorical with choices, else float
    )
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None  # int ranges only
    choices: list[bool | int | float | str] = field(default_factory=list)
    when: str = ""

    def __post_init__(self) -> None:
        if self.type is None:
            self.type = "categorical" if self.choices else "float"
        if self.type == "categorical":
            if len(self.choices) < 2:
                raise ConfigError(
                    f"choices: a categorical parameter needs at least two choices, got {self.choices}; "
                    "set a single value in the sweep's set: list instead"
                )
            if self.low is not None or self.high is not None:
                raise ConfigError("low: a categorical parameter has choices, not low/high")
            return
        if self.choices:
            raise ConfigError(f"choices: a {self.type} parameter has low and high, not choices")
        if self.low is None or self.high is None:
            raise ConfigError(f"low: a {self.type} range needs both low and high")
        if self.low > self.high:
            raise ConfigError(f"low: {self.low:g} is above high {self.high:g}")
        if self.low == self.high:
            raise ConfigError(f"low: equals high ({self.low:g}); set a single value in the sweep's set: list")
        if self.log and self.low <= 0:
            raise ConfigError(f"low: a log range must stay above 0, got low {self.low:g}")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ConfigError(f"low: an int range needs whole numbers, got {self.low:g}..{self.high:g}")
            if self.step is not None and (self.step < 1 or self.log):
                raise ConfigError("step: must be >= 1, and an int range with a step cannot be log")
        elif self.step is not None:
            raise ConfigError("step: only for int ranges (a float grid is categorical choices)")

    @property
    def condition(self) -> tuple[str, str] | None:
        """(other parameter, the value it must take) for ``when``; None when unconditional."""
        if not self.when:
            return None
        match = _WHEN.fullmatch(self.when)
        if match is None:
            raise ConfigError(f"when: {self.when!r} must read OTHER_KEY=VALUE")
        return match.group(1), match.group(2)

    def grid_values(self) -> list[Any]:
        """Every value the grid sampler visits."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        raise ConfigError("the grid sampler needs categorical choices or int ranges, not a float range")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """A metric of the trial's metrics.jsonl and whether smaller or larger is better."""

    metric: str
    direction: Literal["minimize", "maximize"] = "minimize"


@dataclass(frozen=True)
class Constraint:
    """``METRIC <= BOUND`` or ``METRIC >= BOUND``; METRIC may hold ``*`` (every matching metric must hold)."""

    pattern: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str, key: str) -> Constraint:
        match = _CONSTRAINT.fullmatch(text)
        if match is None:
            raise ConfigError(f"{key}: {text!r} must read METRIC <= NUMBER or METRIC >= NUMBER")
        try:
            bound = float(match.group(3))
        except ValueError:
            raise ConfigError(f"{key}: {match.group(3)!r} is not a number") from None
        return cls(match.group(1), match.group(2), bound)

    def violation(self, results: dict[str, float]) -> float | None:
        """How far the worst matching metric is past the bound (<= 0: satisfied); None when none is logged."""
        values = [v for k, v in results.items() if fnmatch.fnmatchcase(k, self.pattern)]
        if not values:
            return None
        return max((v - self.bound) if self.op == "<=" else (self.bound - v) for v in values)

    def __str__(self) -> str:
        return f"{self.pattern} {self.op} {self.bound:g}"


@dataclass(kw_only=True)
class SamplerConfig:
    """Optuna's sampler: grid, random, tpe, nsga2 (NSGA-II) or gp (Gaussian process)."""

    name: Literal["grid", "random", "tpe", "nsga2", "gp"] = "tpe"
    seed: int = 0
    n_startup_trials: int = 10  # tpe and gp: random trials first
    population_size: int = 50  # nsga2

    def __post_init__(self) -> None:
        if self.n_startup_trials < 0 or self.population_size < 2:
            raise ConfigError("n_startup_trials: must be >= 0 (and population_size >= 2)")


@dataclass(kw_only=True)
class PruningConfig:
    """Stopping bad trials at an evaluation, on one scalar (Optuna does not prune multi-objective studies):
    ``metric`` (default: the first objective's) plus ``constraint_penalty`` times how far the constraints are
    broken at that evaluation, compared with the other trials at the same step."""

    pruner: Literal["none", "median", "successive_halving"] = "none"
    metric: str = ""
    direction: Literal["minimize", "maximize", ""] = ""  # default: the first objective's when metric is its
    constraint_penalty: float = 0.0
    n_startup_trials: int = 2  # median: complete trials before any is pruned
    n_warmup_steps: int = 0  # median: no pruning before this training step
    min_resource: int = 1  # successive_halving: training steps before the first rung
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        if self.constraint_penalty < 0:
            raise ConfigError("constraint_penalty: must be >= 0")
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0 or self.min_resource < 1:
            raise ConfigError("n_startup_trials: must be >= 0 (n_warmup_steps >= 0, min_resource >= 1)")
        if self.reduction_factor < 2:
            raise ConfigError("reduction_factor: must be >= 2")


@dataclass(kw_only=True)
class BudgetConfig:
    """When to start no more trials: after ``trials`` trials (failed ones count, their retries do not) and/or
    ``wall_time`` (Slurm's formats, e.g. 12:00:00) since the sweep first started; running trials finish."""

    trials: int | None = None
    wall_time: str = ""

    def __post_init__(self) -> None:
        if self.trials is None and not self.wall_time:
            raise ConfigError("trials: give a budget: trials, wall_time or both")
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"trials: must be >= 1, got {self.trials}")
        if self.wall_time:
            self.wall_minutes  # noqa: B018 (checks the format)

    @property
    def wall_minutes(self) -> int | None:
        if not self.wall_time:
            return None
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", self.wall_time):
            raise ConfigError(f"wall_time: {self.wall_time!r} is not a time (MINUTES, H:M:S or D-H:M:S)")
        return timeout_minutes(self.wall_time)


@dataclass(kw_only=True)
class SweepConfig:
    """The whole sweep file."""

    base: str  # the base config (YAML), relative to the sweep file
    name: str = ""  # default: the sweep file's name
    root: str = "sweeps"  # trials go to <root>/<name>/trial-NNNN/
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides of the base for every trial
    slurm: dict[str, Any] = field(default_factory=dict)  # each trial's slurm keys (nodes, time, ...)
    space: dict[str, ParamConfig] = field(default_factory=dict)
    objectives: list[ObjectiveConfig] = field(default_factory=list)
    objectives_at: Literal["last", "best"] = "last"  # best: the eval where the first objective was best
    constraints: list[str] = field(default_factory=list)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    budget: BudgetConfig
    parallel: int = 1  # trials in flight
    retries: int = 1  # resubmissions of a trial whose job failed, before it is marked failed
    storage: str = "journal"  # journal (a file in the sweep folder), or an RDB URL / env:VARIABLE naming one
    poll_s: float = 30.0
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # points tried first (e.g. the base values)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or "x"):
            raise ConfigError(
                f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
            )
        if not self.space:
            raise ConfigError("space: nothing to search; name at least one config key")
        if not self.objectives:
            raise ConfigError("objectives: name at least one metric to minimize or maximize")
        if self.parallel < 1 or self.retries < 0 or self.poll_s <= 0:
            raise ConfigError("parallel: must be >= 1 (retries >= 0, poll_s > 0)")
        for i, text in enumerate(self.constraints):
            Constraint.parse(text, f"constraints.{i}")
        seen: list[str] = []
        for key, param in self.space.items():
            condition = param.condition
            if condition is not None:
                other = self.space.get(condition[0])
                if condition[0] not in seen or other is None or other.type != "categorical":
                    raise ConfigError(
                        f"space.{key}.when: {condition[0]!r} must be a categorical parameter listed before it"
                    )
                if condition[1] not in [choice_text(c) for c in other.choices]:
                    raise ConfigError(
                        f"space.{key}.when: {condition[1]!r} is not one of {condition[0]}'s choices {other.choices}"
                    )
            seen.append(key)
        if self.sampler.name == "grid":
            conditional = [k for k, p in self.space.items() if p.condition is not None]
            if conditional:
                raise ConfigError(
                    f"sampler.name: grid cannot search conditional parameters ({conditional[0]})"
                )
            for key, param in self.space.items():
                if param.type == "float":
                    raise ConfigError(
                        f"space.{key}: the grid sampler needs categorical choices or an int range, not a "
                        "float range (list the values as choices)"
                    )
        for i, point in enumerate(self.enqueue):
            unknown = sorted(set(point) - set(self.space))
            if unknown:
                raise ConfigError(f"enqueue.{i}: {unknown[0]!r} is not a parameter of space")

    @property
    def parsed_constraints(self) -> list[Constraint]:
        return [Constraint.parse(text, f"constraints.{i}") for i, text in enumerate(self.constraints)]

    @property
    def grid_size(self) -> int | None:
        """How many points the grid sampler has (None for the other samplers)."""
        if self.sampler.name != "grid":
            return None
        return math.prod(len(p.grid_values()) for p in self.space.values())

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.name

    @property
    def pruning_metric(self) -> tuple[str, str]:
        """(metric, direction) that pruning compares."""
        first = self.objectives[0]
        metric = self.pruning.metric or first.metric
        direction = self.pruning.direction or (first.direction if metric == first.metric else "minimize")
        return metric, direction

    def storage_url(self) -> str:
        """The RDB URL (``env:VAR`` read from the environment, so no password sits in the file), or ``journal``."""
        if self.storage.startswith("env:"):
            variable = self.storage[4:]
            value = os.environ.get(variable, "")
            if not value:
                raise ConfigError(
                    f"storage: {self.storage} names the environment variable {variable}, which is unset"
                )
            return value
        return self.storage


def choice_text(value: Any) -> str:
    """A parameter value as ``when`` compares it (``true``, ``0.2``, ``kl``)."""
    return value if isinstance(value, str) else json.dumps(value)


def param_override(key: str, value: Any) -> str:
    """``KEY=VALUE`` for the config loader (JSON is YAML, so strings stay strings)."""
    return f"{key}={json.dumps(value)}"


def logged_metrics(config: Config) -> list[str]:
    """Every metric name a run of ``config`` logs to metrics.jsonl that a sweep may read (bias probes: their
    ``bias/<probe>/`` prefix, since their axes come from the probe files)."""
    names = [*TRAIN_METRICS, *available_metrics(config)]
    if config.eval.at_start:
        names += [f"retention/{s.name}/{f}" for s in config.data.retention for f in FORGETTING_STATS]
    for task in config.eval.tasks:
        for metric in task.metric_names:
            names.append(f"task/{task.name}/{metric}_stderr")
            if task.retention:
                names.append(f"task/{task.name}/{metric}_change")
    names += [f"bias/{probe.name or probe.kind}/*" for probe in config.eval.bias.probes]
    return sorted(set(names))


def metric_logged(pattern: str, logged: list[str]) -> bool:
    """Whether ``pattern`` (a name, maybe with ``*``) matches a metric ``logged`` names."""
    return any(
        fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(pattern, name)  # bias/<probe>/* covers bias/<probe>/gender/likelihood_gap
        for name in logged
    )


def check_against_base(sweep: SweepConfig, config: Config, where: str) -> None:
    """Every objective, constraint and pruning metric is one a run of the base config logs."""
    logged = logged_metrics(config)
    named = [(f"objectives.{i}.metric", o.metric) for i, o in enumerate(sweep.objectives)]
    named += [(f"constraints.{i}", c.pattern) for i, c in enumerate(sweep.parsed_constraints)]
    if sweep.pruning.pruner != "none":
        named.append(("pruning.metric", sweep.pruning_metric[0]))
    for key, metric in named:
        if not metric_logged(metric, logged):
            import difflib

            hint = difflib.get_close_matches(metric, logged, n=1)
            raise ConfigError(
                f"{where}{key}: no trial would log {metric!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; a run of the base config logs: {', '.join(logged)}"
                + (
                    ""
                    if config.eval.at_start or "forgetting" not in metric
                    else " (forgetting needs eval.at_start: true for its step-0 baseline)"
                )
            )
