"""The names of held-out metrics, built and read in one place: ``val/loss``, ``retention/<set>/ppl``,
``val/bpb`` (bits per byte), ``retention/<set>/forgetting_pct`` (of perplexity) and
``retention/<set>/forgetting_bpb_pct`` (of bits per byte)."""

from __future__ import annotations

from keeltune.config import DataConfig, TaskConfig
from keeltune.config.schema import FORGETTING_STATS, HELD_OUT_STATS

VALIDATION = "val"
RETENTION = "retention"
LOSS, PPL, BPB = HELD_OUT_STATS  # what every held-out set reports (the config names them for its checks)
FORGETTING, FORGETTING_BPB = FORGETTING_STATS  # the rise of a retention set's perplexity, of its bpb
VAL_LOSS = f"{VALIDATION}/{LOSS}"


def retention_set(name: str) -> str:
    """The held-out set name of retention set ``name`` (as ``data.retention`` names it)."""
    return f"{RETENTION}/{name}"


def metric(held_out: str, stat: str) -> str:
    """``<held-out set>/<stat>``, e.g. ``metric(retention_set("wiki"), PPL)`` is ``retention/wiki/ppl``."""
    return f"{held_out}/{stat}"


def retention_metrics(results: dict[str, float], stat: str) -> dict[str, float]:
    """The ``retention/<set>/<stat>`` entries of ``results``, keyed by the retention set's own name."""
    prefix, suffix = f"{RETENTION}/", f"/{stat}"
    return {
        key[len(prefix) : -len(suffix)]: value
        for key, value in results.items()
        if key.startswith(prefix) and key.endswith(suffix)
    }


def held_out_names(data: DataConfig) -> dict[str, str]:
    """The held-out set name of each held-out config key: ``data.validation`` -> ``val``,
    ``data.retention.<i>`` -> ``retention/<name>``."""
    names = {"data.validation": VALIDATION} if data.validation else {}
    names.update({f"data.retention.{i}": retention_set(r.name) for i, r in enumerate(data.retention)})
    return names


TASK = "task"
STDERR, CHANGE = "_stderr", "_change"


def task_metric(task: str, name: str) -> str:
    """``task/<task>/<metric>``; its standard error is ``task/<task>/<metric>_stderr`` and, for a retention
    task, its change since step 0 (in the metric's own units) ``task/<task>/<metric>_change``."""
    return f"{TASK}/{task}/{name}"


def task_change(
    results: dict[str, float], baseline: dict[str, float], tasks: list[TaskConfig]
) -> dict[str, float]:
    """``task/<task>/<metric>_change`` of every retention task: the metric now minus at step 0."""
    changes = {}
    for task in tasks:
        if not task.retention:
            continue
        for name in task.metric_names:
            key = task_metric(task.name, name)
            if key in results and key in baseline:
                changes[key + CHANGE] = results[key] - baseline[key]
    return changes
