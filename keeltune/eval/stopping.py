"""When to stop before ``max_steps``: early stopping on the task validation loss, and the retention guard (which
may instead keep the best model by task and retention together)."""

from __future__ import annotations

from typing import Any

from keeltune.config import EarlyStoppingConfig, RetentionGuardConfig

WATCHED = "val/loss"


class EarlyStopping:
    """Counts evals without an improvement of ``min_delta`` on ``val/loss``; its state goes into checkpoints."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.patience, self.min_delta = config.patience, config.min_delta
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
        if not self.enabled or WATCHED not in results:
            return False
        loss = results[WATCHED]
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = loss, step, 0
        else:
            self.bad_evals += 1
        return self.exhausted

    def reason(self) -> str:
        return (
            f"early stopping: {WATCHED} did not improve by more than min_delta={self.min_delta:g} for "
            f"patience={self.patience} eval(s); best {self.best:.4g} at step {self.best_step}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def forgetting_breaches(results: dict[str, float], max_forgetting_pct: float | None) -> dict[str, float]:
    """The ``retention/<set>/forgetting_pct`` values above the threshold (none when the guard is off)."""
    if max_forgetting_pct is None:
        return {}
    return {
        key: value
        for key, value in results.items()
        if key.startswith("retention/") and key.endswith("/forgetting_pct") and value > max_forgetting_pct
    }


class BestModel:
    """The retention guard's ``best`` action: the eval with the lowest combined score among those whose
    forgetting is within the threshold; its state goes into checkpoints."""

    def __init__(self, guard: RetentionGuardConfig) -> None:
        self.enabled = guard.action == "best"
        self.max_forgetting_pct = guard.max_forgetting_pct
        self.retention_weight = guard.retention_weight
        self.score: float | None = None
        self.step: int | None = None

    def combined_score(self, results: dict[str, float], baseline: dict[str, float]) -> float:
        """val/loss + retention_weight * the mean rise of the retention sets' loss over the baseline (nats)."""
        rises = [
            value - baseline[key]
            for key, value in results.items()
            if key.startswith("retention/") and key.endswith("/loss") and key in baseline
        ]
        return results[WATCHED] + self.retention_weight * (sum(rises) / len(rises) if rises else 0.0)

    def update(self, step: int, results: dict[str, float], baseline: dict[str, float]) -> bool:
        """Record one eval; True when it is the new best (the caller then keeps this model)."""
        if not self.enabled or WATCHED not in results:
            return False
        if forgetting_breaches(results, self.max_forgetting_pct):
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
