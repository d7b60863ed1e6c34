"""The one shape every bias probe takes: log-likelihood requests and what they mean."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ProbeError(ValueError):
    """A probe file or probe definition that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ProbeItem:
    """One probe item: ``requests`` are (context, continuation) pairs whose continuation log-likelihood the
    model gives (an empty context means the whole sentence after the model's BOS/EOS prefix, as
    lm-evaluation-harness scores a sentence); ``roles`` says what each request is (e.g. "stereotype",
    "anti-stereotype", "unrelated", a group name, "ans0"), in the same order. ``where`` is file:line (or the
    generator's template id) for error messages and per-item outputs; ``meta`` holds what a set's own scoring
    needs (BBQ's label and context condition, a template id, ...)."""

    probe: str
    axis: str
    requests: tuple[tuple[str, str], ...]
    roles: tuple[str, ...]
    where: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.requests) != len(self.roles) or len(self.requests) < 2:
            raise ProbeError(f"{self.where}: a probe item needs at least two requests, each with a role")


@dataclass(frozen=True)
class ProbeScore:
    """A probe's score on one axis: named values (e.g. ``pct_stereotype``) and one number per item for paired
    bootstrap intervals (the same items scored for the base and the fine-tune)."""

    values: dict[str, float]
    per_item: dict[str, list[float]]  # metric -> one value per item, in item order
