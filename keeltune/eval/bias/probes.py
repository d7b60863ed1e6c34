"""``eval.bias``: the configured probes read once (before training: every file error names its file and line),
scored from their log-likelihoods per axis, and compared with the base: amplification = score now - score of
the base on the same items, with a paired bootstrap interval (the same resampled items on both sides).
Torch-free: the login node checks probe files before a job waits in the queue."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keeltune.config import BIAS_AXES, BiasConfig, BiasProbeConfig, Config
from keeltune.eval.bias.builtin import builtin_items, score_pairs, score_templates
from keeltune.eval.bias.items import ProbeError, ProbeItem, ProbeScore
from keeltune.eval.bias.probe_files import read_pair_file, read_template_file
from keeltune.eval.bias.standard_sets import (
    Scorer,
    combine_bbq,
    combine_stereoset,
    read_bbq,
    read_crows_pairs,
    read_stereoset,
    read_winobias,
    score_bbq,
    score_crows_pairs,
    score_stereoset,
    score_winobias,
)

ALL = "all"  # the axis name of a probe's score over all its items
AMPLIFICATION = "_amplification"  # suffix of now - base; its interval: _amplification_lo, _amplification_hi

SCORERS: dict[str, Scorer] = {
    "pairs": score_pairs,
    "templates": score_templates,
    "crows_pairs": score_crows_pairs,
    "stereoset": score_stereoset,
    "winobias": score_winobias,
    "bbq": score_bbq,
}
# what each kind's per-item values are (its metrics are computed from these)
_PER_ITEM = {"stereoset": ("ss", "lms"), "bbq": ("correct", "ambig", "biased")}


def bias_metric(probe: str, axis: str, name: str) -> str:
    """``bias/<probe>/<axis>/<metric>``."""
    return f"bias/{probe}/{axis}/{name}"


@dataclass(frozen=True)
class ProbeSet:
    """One configured probe and its items (after the axis filter and the per-axis subset)."""

    config: BiasProbeConfig
    items: list[ProbeItem]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def axes(self) -> list[str]:
        return sorted({item.axis for item in self.items})

    def counts(self) -> dict[str, int]:
        """Items per axis."""
        found: dict[str, int] = {}
        for item in self.items:
            found[item.axis] = found.get(item.axis, 0) + 1
        return dict(sorted(found.items()))


def _read(probe: BiasProbeConfig) -> list[ProbeItem]:
    path = Path(probe.path) if probe.path else None
    if probe.kind == "pairs":
        return read_pair_file(path) if path else builtin_items(probe.axes or None, ["pairs"])
    if probe.kind == "templates":
        return read_template_file(path) if path else builtin_items(probe.axes or BIAS_AXES, ["templates"])
    if probe.kind == "crows_pairs":
        return read_crows_pairs(path)
    if probe.kind == "stereoset":
        return read_stereoset(path)
    if probe.kind == "winobias":
        return read_winobias(path, Path(probe.anti_path))
    return read_bbq(path)


def _subset(items: list[ProbeItem], limit: int | None) -> list[ProbeItem]:
    """At most ``limit`` items of each axis, evenly spaced (so every attribute or template is represented)."""
    if limit is None:
        return items
    by_axis: dict[str, list[ProbeItem]] = {}
    for item in items:
        by_axis.setdefault(item.axis, []).append(item)
    kept = []
    for axis_items in by_axis.values():
        if len(axis_items) <= limit:
            kept += axis_items
        else:
            kept += [axis_items[int(i)] for i in np.linspace(0, len(axis_items) - 1, limit).round()]
    return kept


def load_probe_sets(config: BiasConfig) -> list[ProbeSet]:
    """Every configured probe read and checked; errors name the probe key and the file and line."""
    sets = []
    for index, probe in enumerate(config.probes):
        key = f"eval.bias.probes.{index}"
        try:
            items = _read(probe)
        except ProbeError as error:
            raise ProbeError(f"{key} ({probe.kind}): {error}") from None
        if probe.axes:
            found = sorted({item.axis for item in items})
            missing = sorted(set(probe.axes) - set(found))
            if missing:
                raise ProbeError(
                    f"{key}.axes: {missing} are not axes of {probe.path or 'the built-in ' + probe.kind}; "
                    f"it has {found}"
                )
            items = [item for item in items if item.axis in probe.axes]
        sets.append(ProbeSet(probe, _subset(items, probe.max_items_per_axis)))
    return sets


def check_probes(config: Config) -> dict[str, dict[str, int]]:
    """Read every probe of the config (errors before a job is queued); items per probe and axis."""
    return {probe.name: probe.counts() for probe in load_probe_sets(config.eval.bias)}


# --------------------------------------------------------------------------------- scores and amplification


@dataclass(frozen=True)
class ScoredProbe:
    """A probe's per-item values (``_PER_ITEM`` for stereoset and bbq, else its metrics), in item order, and the
    scorer's full output per axis (written to the per-item file)."""

    probe: ProbeSet
    per_item: dict[str, np.ndarray]
    by_axis: dict[str, ProbeScore]

    def indices(self, axis: str) -> np.ndarray:
        if axis == ALL:
            return np.arange(len(self.probe.items))
        return np.array([i for i, item in enumerate(self.probe.items) if item.axis == axis])

    def values(self, index: np.ndarray) -> dict[str, float]:
        """The probe's metrics over the items at ``index`` (repeats allowed: a bootstrap resample)."""
        kind, items = self.probe.config.kind, self.probe.items
        if kind == "stereoset":
            targets = [items[i].meta["target"] for i in index]
            return combine_stereoset(targets, self.per_item["ss"][index], self.per_item["lms"][index])
        if kind == "bbq":
            return combine_bbq(*(self.per_item[name][index] for name in _PER_ITEM["bbq"]))
        return {name: float(self.per_item[name][index].mean()) for name in self.probe.config.metrics}


def score_probe(probe: ProbeSet, lls: Sequence[Sequence[float]]) -> ScoredProbe:
    """Score each axis of the probe with its set's own scorer; keep the per-item values."""
    scorer = SCORERS[probe.config.kind]
    names = _PER_ITEM.get(probe.config.kind, probe.config.metrics)
    per_item = {name: np.full(len(probe.items), np.nan) for name in names}
    by_axis = {}
    for axis in probe.axes:
        index = [i for i, item in enumerate(probe.items) if item.axis == axis]
        score = scorer([probe.items[i] for i in index], [lls[i] for i in index])
        by_axis[axis] = score
        for name in names:
            per_item[name][index] = score.per_item[name]
    return ScoredProbe(probe, per_item, by_axis)


def paired_bootstrap(
    now: ScoredProbe, base: ScoredProbe, index: np.ndarray, *, iters: int, confidence: float, seed: int
) -> dict[str, tuple[float, float]]:
    """The percentile interval of (metric now - metric of the base) over ``iters`` resamples of the items at
    ``index``, the same resampled items on both sides; NaN where no resample has a value."""
    rng = np.random.default_rng(seed)
    draws = index[rng.integers(0, len(index), size=(iters, len(index)))]
    metrics = now.probe.config.metrics
    if now.probe.config.kind in _PER_ITEM:
        rows = [(now.values(d), base.values(d)) for d in draws]
        diffs = {m: np.array([a[m] - b[m] for a, b in rows]) for m in metrics}
    else:  # means of per-item values: one vectorised pass
        diffs = {m: (now.per_item[m] - base.per_item[m])[draws].mean(axis=1) for m in metrics}
    tail = (1.0 - confidence) / 2.0 * 100.0
    intervals = {}
    for name, values in diffs.items():
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            intervals[name] = (math.nan, math.nan)
        else:
            intervals[name] = (float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail)))
    return intervals


def bias_results(
    probe: ProbeSet,
    lls: Sequence[Sequence[float]],
    base_lls: Sequence[Sequence[float]] | None,
    config: BiasConfig,
) -> dict[str, float]:
    """``bias/<probe>/<axis>/<metric>`` for every axis and ``all``; with the base's log-likelihoods of the same
    items, also ``..._amplification`` (now - base) and its interval ``..._amplification_lo`` / ``_hi``.
    Values that do not exist (e.g. a BBQ score without a non-unknown answer) are left out."""
    now = score_probe(probe, lls)
    base = score_probe(probe, base_lls) if base_lls is not None else None
    results: dict[str, float] = {}
    for offset, axis in enumerate([ALL, *probe.axes]):
        index = now.indices(axis)
        values = now.values(index)
        before = base.values(index) if base is not None else {}
        intervals = (
            paired_bootstrap(
                now, base, index, iters=config.bootstrap_iters, confidence=config.confidence,
                seed=config.seed + offset,
            )
            if base is not None
            else {}
        )  # fmt: skip
        for name in probe.config.metrics:
            key = bias_metric(probe.name, axis, name)
            found = {key: values[name]}
            if base is not None:
                found[key + AMPLIFICATION] = values[name] - before[name]
                found[key + AMPLIFICATION + "_lo"], found[key + AMPLIFICATION + "_hi"] = intervals[name]
            results.update({k: v for k, v in found.items() if math.isfinite(v)})
    return results


def item_rows(probe: ProbeSet, lls: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """One row per item for the per-item file: where it comes from, its axis, roles and log-likelihoods."""
    return [
        {"where": item.where, "axis": item.axis, "roles": list(item.roles), "lls": list(row)}
        for item, row in zip(probe.items, lls, strict=True)
    ]
