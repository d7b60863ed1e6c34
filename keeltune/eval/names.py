"""The names of held-out metrics, built and read in one place: ``val/loss``, ``retention/<set>/ppl``,
``retention/<set>/forgetting_pct``."""

from __future__ import annotations

from keeltune.config import DataConfig

VALIDATION = "val"
RETENTION = "retention"
LOSS, PPL, FORGETTING = "loss", "ppl", "forgetting_pct"
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
