"""Regularizers against forgetting, one module each, on the backend's uniform view (``local_parameters``,
``reference_logits``, ``local_gradients``), so each works for every backend. ``REGULARIZERS`` maps a section of
``regularization`` to its builder; a section whose ``weight`` is 0 builds nothing. Adding one: a module here, its
config section, an entry below, its tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from keeltune.config import Config
from keeltune.training.regularizers.base import LossTerm, Regularizer, RegularizerContext
from keeltune.training.regularizers.consistency import Consistency
from keeltune.training.regularizers.ewc import EWC
from keeltune.training.regularizers.kl import KLToBase
from keeltune.training.regularizers.l2sp import L2SP
from keeltune.training.regularizers.lora_change import LoraChange, trains_adapters

__all__ = [
    "REGULARIZERS",
    "LossTerm",
    "Regularizer",
    "RegularizerContext",
    "build_regularizers",
    "needs_reference",
]


def _l2sp(context: RegularizerContext) -> Regularizer:
    """On LoRA adapters the weight change is B @ A (their own values start at random A and zero B)."""
    if trains_adapters(context.backend.local_parameters()):
        return LoraChange(context)
    return L2SP(context)


@dataclass(frozen=True)
class RegularizerSpec:
    build: Callable[[RegularizerContext], Regularizer]
    needs_reference: bool = False  # the backend must keep the pretrained model for reference_logits


REGULARIZERS: dict[str, RegularizerSpec] = {
    "kl": RegularizerSpec(KLToBase, needs_reference=True),
    "l2sp": RegularizerSpec(_l2sp),
    "ewc": RegularizerSpec(EWC),
    "consistency": RegularizerSpec(Consistency),
}


def _active(config: Config) -> list[str]:
    return [name for name in REGULARIZERS if getattr(config.regularization, name).weight > 0]


def needs_reference(config: Config) -> bool:
    """Whether the backend must be built with ``keep_reference``."""
    return any(REGULARIZERS[name].needs_reference for name in _active(config))


def build_regularizers(context: RegularizerContext) -> list[Regularizer]:
    """The active regularizers, built before any step or resume (weight-space ones take the pretrained values)."""
    return [REGULARIZERS[name].build(context) for name in _active(context.config)]
