"""KL divergence to the pretrained model's token distribution (a loss-side term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keeltune.training.regularizers.base import LossTerm, Regularizer, RegularizerContext


def token_kl(
    logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Summed KL(reference || model) over the tokens whose mask is 1, both softened by ``temperature``; times
    temperature^2 so its gradients keep their scale (Hinton et al.)."""
    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_p = F.log_softmax(reference.to(logits.dtype) / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (per_token * mask.to(per_token.dtype)).sum() * temperature**2


class KLToBase(Regularizer):
    """With a domain vocabulary the reference is the extended base, and both distributions are taken over the
    base vocabulary's rows (renormalised there): the new tokens have no distribution of the original base."""

    name = "kl"

    def __init__(self, context: RegularizerContext) -> None:
        self.backend = context.backend
        self.weight = context.config.regularization.kl.weight
        self.temperature = context.config.regularization.kl.temperature
        self.rows = context.base_vocab_size  # with a domain vocabulary: compared on the base vocabulary only

    def loss_term(self, input_ids: torch.Tensor) -> LossTerm:
        reference = self.backend.reference_logits(input_ids)[..., : self.rows]
        return lambda logits, mask: (
            self.weight * token_kl(logits[..., : self.rows], reference, mask, self.temperature)
        )
