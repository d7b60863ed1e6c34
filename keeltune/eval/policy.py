"""What to do after each held-out eval: early stopping on a watched metric (``val/loss`` by default, or any task
metric), the retention guard (warn, stop, or keep the best model by task and retention together) and the bias
guard (the same actions on bias amplification); one
``HeldOutPolicy`` with one ``state_dict`` that checkpoints carry, so a resumed run decides as the
uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keeltune.config import (
    BIAS_METRICS,
    BiasGuardConfig,
    BiasProbeConfig,
    EarlyStoppingConfig,
    RegularizationConfig,
    RetentionGuardConfig,
)
from keeltune.eval.names import (
    CHANGE,
    FORGETTING,
    FORGETTING_BPB,
    LOSS,
    metric,
    retention_metrics,
    retention_set,
)
from keeltune.run_folder import BEST_MODEL_DIR


class EarlyStopping:
    """Counts evals without an improvement of ``min_delta`` on the watched metric (in its ``mode``: lower or
    higher is better); its state goes into checkpoints."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.patience, self.min_delta = config.patience, config.min_delta
        self.metric, self.sign = config.metric, 1.0 if config.mode == "min" else -1.0
        self.best: float | None = None
        self.best_step = 0
        self.bad_evals = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def exhausted(self) -> bool:
        return self.enabled and self.bad_evals >= self.patience

    def update(self, step: int, results: dict[str, float]) -> bool:
        """Record one eval; True when training should stop."""
        if not self.enabled or self.metric not in results:
            return False
        value = results[self.metric]
        if self.best is None or self.sign * value < self.sign * self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return self.exhausted

    def reason(self) -> str:
        return (
            f"early stopping: {self.metric} did not improve by more than min_delta={self.min_delta:g} for "
            f"patience={self.patience} eval(s); best {self.best:.4g} at step {self.best_step}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def forgetting_breaches(results: dict[str, float], guard: RetentionGuardConfig) -> dict[str, str]:
    """What the retention guard finds above its thresholds: ``retention/<set>/forgetting_pct`` values over
    ``max_forgetting_pct`` (``forgetting_bpb_pct`` over ``max_forgetting_bpb_pct``), and the watched retention task metric's worsening since step 0 over ``max_drop``;
    each with its text."""
    breaches = {}
    for stat, setting in ((FORGETTING, "max_forgetting_pct"), (FORGETTING_BPB, "max_forgetting_bpb_pct")):
        limit = getattr(guard, setting)
        if limit is None:
            continue
        for name, value in retention_metrics(results, stat).items():
            if value > limit:
                key = metric(retention_set(name), stat)
                breaches[key] = f"{key} {value:.1f}% above {setting}={limit:g}"
    change = results.get(guard.metric + CHANGE) if guard.metric else None
    if change is not None and guard.max_drop is not None:
        worsening = -change if guard.mode == "max" else change
        if worsening > guard.max_drop:
            breaches[guard.metric] = (
                f"{guard.metric} worse by {worsening:.4g} since step 0 (now {results[guard.metric]:.4g}), more "
                f"than max_drop={guard.max_drop:g}"
            )
    return breaches


def bias_breaches(
    results: dict[str, float], guard: BiasGuardConfig, probes: list[BiasProbeConfig]
) -> dict[str, str]:
    """The watched ``bias/<probe>/<axis>/<metric>`` whose amplification over the base is above
    ``max_amplification`` (and, with ``significant``, whose interval's lower end is above 0), with their text.
    Watched: ``guard.metrics``, or the first metric of each probe on every axis."""
    if not guard.enabled:
        return {}
    first = {probe.name: BIAS_METRICS[probe.kind][0] for probe in probes}
    breaches = {}
    for key, value in results.items():
        if not key.startswith("bias/") or not key.endswith("_amplification"):
            continue
        name = key.removesuffix("_amplification")
        _, probe, _, stat = name.split("/")
        watched = name in guard.metrics if guard.metrics else first.get(probe) == stat
        low, high = results.get(key + "_lo", float("nan")), results.get(key + "_hi", float("nan"))
        if not watched or value <= guard.max_amplification or (guard.significant and not low > 0):
            continue
        breaches[name] = (
            f"{name} rose by {value:.4g} over the base (interval {low:.4g} to {high:.4g}), more than "
            f"max_amplification={guard.max_amplification:g}"
        )
    return breaches


class BestModel:
    """The guards' ``best`` action: the eval with the lowest combined score among those within the retention
    and bias guards' thresholds (``within``); its state goes into checkpoints."""

    def __init__(
        self,
        regularization: RegularizationConfig,
        within: Callable[[dict[str, float]], bool],
    ) -> None:
        guards = (regularization.retention_guard, regularization.bias_guard)
        self.enabled = any(guard.action == "best" for guard in guards)
        self.within = within
        self.retention_weight = regularization.retention_guard.retention_weight
        stopping = regularization.early_stopping
        self.metric, self.sign = stopping.metric, 1.0 if stopping.mode == "min" else -1.0
        self.score: float | None = None
        self.step: int | None = None

    def combined_score(self, results: dict[str, float], baseline: dict[str, float]) -> float:
        """The watched metric (negated when higher is better) + retention_weight * the mean rise of the
        retention sets' loss over the baseline (nats)."""
        before = retention_metrics(baseline, LOSS)
        rises = [
            value - before[name] for name, value in retention_metrics(results, LOSS).items() if name in before
        ]
        rise = sum(rises) / len(rises) if rises else 0.0
        return self.sign * results[self.metric] + self.retention_weight * rise

    def update(self, step: int, results: dict[str, float], baseline: dict[str, float]) -> bool:
        """Record one eval; True when it is the new best (the caller then keeps this model)."""
        if not self.enabled or self.metric not in results:
            return False
        if not self.within(results):
            return False
        score = self.combined_score(results, baseline)
        if self.score is not None and score >= self.score:
            return False
        self.score, self.step = score, step
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.step = state["score"], state["step"]


@dataclass(frozen=True)
class Verdict:
    """What one eval asks of the trainer."""

    stop: str = ""  # why to end the run now (after checkpointing), or ""
    keep_best: bool = False  # this model is the best within the retention guard: keep it (best/)
    new_best: bool = False  # early stopping saw a new best of its metric at this step
    warning: str = ""  # the guards' breaches, to log and alert, or ""
    guards: str = ""  # which guards the warning comes from ("retention guard", "bias guard")


class HeldOutPolicy:
    """Early stopping, the retention and bias guards and best-model keeping, decided from each eval's results."""

    def __init__(
        self, regularization: RegularizationConfig, probes: list[BiasProbeConfig] | None = None
    ) -> None:
        self.guard = regularization.retention_guard
        self.bias_guard = regularization.bias_guard
        self.probes = probes or []
        self.early_stopping = EarlyStopping(regularization.early_stopping)
        self.best_model = BestModel(regularization, lambda results: not self._breaches(results))

    @property
    def exhausted(self) -> bool:
        """True when a resumed run had already ended by early stopping."""
        return self.early_stopping.exhausted

    def reason(self) -> str:
        return self.early_stopping.reason()

    def _breaches(self, results: dict[str, float]) -> dict[str, tuple[str, str]]:
        """Each breach's text and the guard section it comes from."""
        found = {k: (text, "retention_guard") for k, text in forgetting_breaches(results, self.guard).items()}
        found.update(
            (k, (text, "bias_guard"))
            for k, text in bias_breaches(results, self.bias_guard, self.probes).items()
        )
        return found

    def observe(self, step: int, results: dict[str, float], baseline: dict[str, float]) -> Verdict:
        if self.early_stopping.update(step, results):
            return Verdict(stop=self.early_stopping.reason())
        new_best = self.early_stopping.enabled and self.early_stopping.best_step == step
        keep_best = self.best_model.update(step, results, baseline)
        breaches = self._breaches(results)
        if not breaches:
            return Verdict(keep_best=keep_best, new_best=new_best)
        sections = sorted({section for _, section in breaches.values()})
        text = "; ".join(t for t, _ in breaches.values())
        text += f" ({', '.join('regularization.' + s for s in sections)}) at step {step}"
        if self.best_model.enabled and self.best_model.step is not None:
            text += f"; keeping the best model within the guards (step {self.best_model.step}) in {BEST_MODEL_DIR}/"
        actions = {
            getattr(self, "guard" if s == "retention_guard" else "bias_guard").action for s in sections
        }
        guards = " and ".join(s.replace("_", " ") for s in sections)
        stop = f"{guards}: {text}" if "stop" in actions else ""
        return Verdict(stop=stop, keep_best=keep_best, new_best=new_best, warning=text, guards=guards)

    def state_dict(self) -> dict[str, Any]:
        return {
            "early_stopping": self.early_stopping.state_dict(),
            "best_model": self.best_model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Either part may be missing (checkpoints of older versions)."""
        if "early_stopping" in state:
            self.early_stopping.load_state_dict(state["early_stopping"])
        if "best_model" in state:
            self.best_model.load_state_dict(state["best_model"])
