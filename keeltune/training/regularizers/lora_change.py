"""L2-SP for LoRA adapters: 1/2 w sum over adapted layers of ||scale * B @ A||^2, the change of their effective
weights (theta_0 is implicit: B starts at zero)."""

from __future__ import annotations

import torch

from keeltune.sharding.base import LocalParameter
from keeltune.training.regularizers.base import Regularizer, RegularizerContext

A, B = ".lora_A.", ".lora_B."


def adapter_pairs(params: list[LocalParameter]) -> list[tuple[LocalParameter, LocalParameter]]:
    """(A, B) of each adapted layer, matched by name (``<layer>.lora_A.<adapter>.weight``)."""
    by_name = {p.name: p for p in params}
    return [(p, by_name[p.name.replace(A, B)]) for p in params if A in p.name]


def trains_adapters(params: list[LocalParameter]) -> bool:
    return bool(params) and all(A in p.name or B in p.name for p in params)


class LoraChange(Regularizer):
    """Computed as scale^2 * sum((B^T B) * (A A^T)), with r x r matrices only (the full B @ A is never built);
    needs whole adapters, so replicas only."""

    name = "l2sp"

    def __init__(self, context: RegularizerContext) -> None:
        if context.backend.partitioned:
            raise ValueError(
                "the LoRA weight-change penalty needs whole adapters on every rank (a replica backend)"
            )
        qlora = context.config.sharding.qlora
        self.context, self.scale = context, qlora.alpha / qlora.rank  # peft's scaling without rsLoRA
        self.weight = context.config.regularization.l2sp.weight

    def add_gradients(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for a_param, b_param in adapter_pairs(self.context.backend.local_parameters()):
            a = a_param.value.detach().requires_grad_(True)
            b = b_param.value.detach().requires_grad_(True)
            term = 0.5 * self.weight * self.scale**2 * ((b.T @ b) * (a @ a.T)).sum()
            grad_a, grad_b = torch.autograd.grad(term, [a, b])
            a_param.add_to_grad(grad_a)
            b_param.add_to_grad(grad_b)
            total += float(term.detach())
        return float(total)
