"""L2-SP: 1/2 w sum (theta - theta_0)^2, pulling the weights back to their pretrained values."""

from __future__ import annotations

import torch

from keeltune.training.regularizers.base import Regularizer, RegularizerContext


class L2SP(Regularizer):
    name = "l2sp"

    def __init__(self, context: RegularizerContext) -> None:
        self.context = context
        self.weight = context.config.regularization.l2sp.weight
        self.anchors = context.pretrained()

    def add_gradients(self) -> float:
        local = torch.zeros((), dtype=torch.float64, device=self.context.parallel.device)
        for param in self.context.backend.local_parameters():
            change = param.value - self.anchors[param.name]
            local += 0.5 * (change.double() ** 2).sum()
            param.add_to_grad(self.weight * change)
        return self.weight * float(self.context.total(local))
