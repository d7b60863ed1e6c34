"""What to do after each held-out eval: early stopping on a watched metric (``val/loss`` by default, or any task
metric), and the retention guard (warn, stop, or keep the best model by task and retention together); one
``HeldOutPolicy`` with one ``state_dict`` that checkpoints carry, so a resumed run decides as the
uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keeltune.config import EarlyStoppingConfig, RegularizationConfig, RetentionGuardConfig
from keeltune.eval.names import CHANGE, FORGETTING, LOSS, metric, retention_metrics, retention_set
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
    ``max_forgetting_pct``, and the watched retention task metric's worsening since step 0 over ``max_drop``;
    each with its text."""
    breaches = {}
    if guard.max_forgetting_pct is not None:
        for name, value in retention_metrics(results, FORGETTING).items():
            if value > guard.max_forgetting_pct:
                key = metric(retention_set(name), FORGETTING)
                breaches[key] = f"{key} {value:.1f}% above max_forgetting_pct={guard.max_forgetting_pct:g}"
    change = results.get(guard.metric + CHANGE) if guard.metric else None
    if change is not None and guard.max_drop is not None:
        worsening = -change if guard.mode == "max" else change
        if worsening > guard.max_drop:
            breaches[guard.metric] = (
                f"{guard.metric} worse by {worsening:.4g} since step 0 (now {results[guard.metric]:.4g}), more "
                f"than max_drop={guard.max_drop:g}"
            )
    return breaches


class BestModel:
    """The retention guard's ``best`` action: the eval with the lowest combined score among those whose
    forgetting is within the threshold; its state goes into checkpoints."""

    def __init__(self, guard: RetentionGuardConfig, stopping: EarlyStoppingConfig) -> None:
        self.enabled = guard.action == "best"
        self.guard = guard
        self.retention_weight = guard.retention_weight
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
        if forgetting_breaches(results, self.guard):
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
    warning: str = ""  # the retention guard's breach, to log and alert, or ""


class HeldOutPolicy:
    """Early stopping, the retention guard and best-model keeping, decided from each eval's results."""

    def __init__(self, regularization: RegularizationConfig) -> None:
        self.guard = regularization.retention_guard
        self.early_stopping = EarlyStopping(regularization.early_stopping)
        self.best_model = BestModel(self.guard, regularization.early_stopping)

    @property
    def exhausted(self) -> bool:
        """True when a resumed run had already ended by early stopping."""
        return self.early_stopping.exhausted

    def reason(self) -> str:
        return self.early_stopping.reason()

    def observe(self, step: int, results: dict[str, float], baseline: dict[str, float]) -> Verdict:
        if self.early_stopping.update(step, results):
            return Verdict(stop=self.early_stopping.reason())
        new_best = self.early_stopping.enabled and self.early_stopping.best_step == step
        keep_best = self.best_model.update(step, results, baseline)
        breaches = forgetting_breaches(results, self.guard)
        if not breaches:
            return Verdict(keep_best=keep_best, new_best=new_best)
        text = "; ".join(breaches.values()) + f" (regularization.retention_guard) at step {step}"
        if self.guard.action == "best" and self.best_model.step is not None:
            text += f"; keeping the best model within it (step {self.best_model.step}) in {BEST_MODEL_DIR}/"
        stop = f"retention guard: {text}" if self.guard.action == "stop" else ""
        return Verdict(stop=stop, keep_best=keep_best, new_best=new_best, warning=text)

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
