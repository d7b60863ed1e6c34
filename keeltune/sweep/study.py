"""The Optuna study of a sweep: its storage (a journal file in the sweep folder, with Optuna's open-file lock
that works on NFS; or an RDB such as PostgreSQL), sampler and pruner, and the companion study pruning uses.

Optuna does not prune multi-objective studies, so every sweep prunes through a single-objective companion
study ``<name>:pruning`` on the declared scalar (``PruningConfig``): each trial has a partner there that gets
its intermediate values and asks the pruner."""

from __future__ import annotations

from typing import Any

import optuna

from keeltune.config import ConfigError
from keeltune.config.sweep import SweepConfig, choice_text

JOURNAL_FILE = "study.journal"
PRUNING_SUFFIX = ":pruning"
CONSTRAINTS_ATTR = "constraints"  # a trial's constraint violations (<= 0: met), read by the samplers
PARTNER_ATTR = "pruning_trial_id"  # the trial's partner in the pruning study
FAILURE_ATTR = "failure"  # why a trial failed
STEP_ATTR = "objective_step"  # the eval step its objectives were read at
STARTED_ATTR = "started"  # the sweep's first start (unix time), for the wall-time budget

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_for(sweep: SweepConfig) -> optuna.storages.BaseStorage:
    """The journal file in the sweep folder, or the RDB named by ``storage``."""
    url = sweep.storage_url()
    if url == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(sweep.folder / JOURNAL_FILE)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if "://" not in url:
        raise ConfigError(f"storage: {url!r} is neither journal nor a database URL (postgresql://...)")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as err:  # the driver's message, not the password in the URL
        raise ConfigError(f"storage: cannot open the database {hide_password(url)}: {err}") from None


def hide_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def record_constraints(trial: optuna.Trial, sweep: SweepConfig, violations: list[float]) -> None:
    """The trial's constraint violations, before it is told: for the samplers that use them (tpe, nsga2, gp)
    and for the report."""
    trial.set_user_attr(CONSTRAINTS_ATTR, violations)
    for i, (text, value) in enumerate(zip(sweep.constraints, violations, strict=True)):
        trial.set_constraint(f"{i}: {text}", value)


def sampler_for(sweep: SweepConfig) -> optuna.samplers.BaseSampler:
    config = sweep.sampler
    if config.name == "grid":
        space = {key: param.grid_values() for key, param in sweep.space.items()}
        return AskTellGridSampler(space, seed=config.seed)
    if config.name == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    if config.name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=config.seed)
    if config.name == "gp":
        return optuna.samplers.GPSampler(seed=config.seed, n_startup_trials=config.n_startup_trials)
    return optuna.samplers.TPESampler(
        seed=config.seed,
        n_startup_trials=config.n_startup_trials,
        multivariate=True,
    )


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its stop at the grid's end (``Study.stop`` works only inside
    ``optimize``); the driver starts no trial beyond the grid (``SweepConfig.grid_size``)."""

    def after_trial(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: Any, values: Any
    ) -> None:
        return None


def pruner_for(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    config = sweep.pruning
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=config.n_startup_trials, n_warmup_steps=config.n_warmup_steps
        )
    if config.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=config.min_resource, reduction_factor=config.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_studies(sweep: SweepConfig, *, create: bool) -> tuple[optuna.Study, optuna.Study]:
    """The sweep's study and its pruning companion (created when ``create``, else they must exist)."""
    storage = storage_for(sweep)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not create and sweep.name not in names:
        raise ConfigError(f"sweep {sweep.name}: no study of that name in {describe_storage(sweep)}")
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.name,
        directions=sweep.directions,
        sampler=sampler_for(sweep),
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != sweep.directions:
        raise ConfigError(
            f"sweep {sweep.name}: the study in {describe_storage(sweep)} has other objectives' directions "
            f"({[d.name.lower() for d in study.directions]}); name the sweep differently"
        )
    pruning = optuna.create_study(
        storage=storage,
        study_name=sweep.name + PRUNING_SUFFIX,
        direction=sweep.pruning_metric[1],
        pruner=pruner_for(sweep),
        load_if_exists=True,
    )
    return study, pruning


def describe_storage(sweep: SweepConfig) -> str:
    url = sweep.storage_url()
    return str(sweep.folder / JOURNAL_FILE) if url == "journal" else hide_password(url)


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> dict[str, Any]:
    """The trial's parameters, in the space's order; a conditional one only when its condition holds."""
    params: dict[str, Any] = {}
    for key, param in sweep.space.items():
        condition = param.condition
        if condition is not None:
            other = params.get(condition[0])
            if other is None or choice_text(other) != condition[1]:
                continue
        if param.type == "categorical":
            params[key] = trial.suggest_categorical(key, param.choices)
        elif param.type == "int":
            params[key] = trial.suggest_int(
                key, int(param.low), int(param.high), step=param.step or 1, log=param.log
            )
        else:
            params[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
    return params
