"""Weight-space penalties against forgetting (L2-SP, EWC) and NEFTune's embedding noise, for the backends.

Penalties are added once per optimizer step, after the gradients are reduced over ranks: every rank holds the
same weights, so every rank adds the same exact penalty gradient, whatever the number of ranks or micro-batches.
"""

from __future__ import annotations

import math

import torch

from keeltune.config import RegularizationConfig


def l2sp_penalty(params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor]) -> torch.Tensor:
    """1/2 * sum (theta - theta_0)^2."""
    return 0.5 * sum(((p - anchors[n]) ** 2).sum() for n, p in params.items())


def ewc_penalty(
    params: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]
) -> torch.Tensor:
    """1/2 * sum F (theta - theta_0)^2."""
    return 0.5 * sum((fisher[n] * (p - anchors[n]) ** 2).sum() for n, p in params.items())


def lora_change_penalty(model: torch.nn.Module) -> torch.Tensor:
    """1/2 * sum over adapted layers of ||scale * B @ A||^2, the change of their effective weights.

    Computed as scale^2 * sum((B^T B) * (A A^T)), with r x r matrices only (the full B @ A is never built)."""
    from peft.tuners.lora import LoraLayer

    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                a = module.lora_A[adapter].weight.float()
                b = module.lora_B[adapter].weight.float()
                total = total + module.scaling[adapter] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return 0.5 * total


def add_penalty_gradients(
    terms: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]
) -> dict[str, float]:
    """Add the gradient of the sum of ``terms`` to ``params``' gradients; return each term's value."""
    if not terms:
        return {}
    names = list(params)
    grads = torch.autograd.grad(sum(terms.values()), [params[n] for n in names], allow_unused=True)
    with torch.no_grad():
        for name, grad in zip(names, grads, strict=True):
            if grad is None:
                continue
            param = params[name]
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))
    return {f"train/{key}": float(value.detach()) for key, value in terms.items()}


class WeightAnchor:
    """The pretrained values of the trainable parameters, and the L2-SP and EWC penalties measured from them."""

    def __init__(
        self, model: torch.nn.Module, reg: RegularizationConfig, base: torch.nn.Module | None = None
    ) -> None:
        """``base``: a frozen copy of the pretrained model already kept (for KL), whose weights are reused."""
        self.model = model
        self.l2sp_weight, self.ewc_weight = reg.l2sp.weight, reg.ewc.weight
        self.anchors: dict[str, torch.Tensor] = {}
        if self.l2sp_weight > 0 or self.ewc_weight > 0:
            frozen = dict(base.named_parameters()) if base is not None else {}
            self.anchors = {
                n: frozen[n] if n in frozen else p.detach().clone() for n, p in self._params().items()
            }
        self.fisher: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def set_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        """Use ``fisher`` (one tensor per trainable parameter) for the EWC penalty."""
        params = self._params()
        wrong = sorted(set(params) ^ set(fisher)) or [n for n in params if fisher[n].shape != params[n].shape]
        if wrong:
            raise ValueError(f"EWC Fisher does not fit the trainable parameters (e.g. {wrong[:3]})")
        self.fisher = {n: fisher[n].to(params[n].device, torch.float32) for n in params}

    def terms(self) -> dict[str, torch.Tensor]:
        """The active penalties, weighted, as differentiable scalars."""
        params = self._params()
        terms = {}
        if self.l2sp_weight > 0:
            terms["l2sp"] = self.l2sp_weight * l2sp_penalty(params, self.anchors)
        if self.ewc_weight > 0:
            if not self.fisher:
                raise RuntimeError(
                    "EWC is on but no Fisher was set (the trainer estimates it before training)"
                )
            terms["ewc"] = self.ewc_weight * ewc_penalty(params, self.anchors, self.fisher)
        return terms

    def add_gradients(self) -> dict[str, float]:
        return add_penalty_gradients(self.terms(), self._params())


def add_neftune(model: torch.nn.Module, alpha: float) -> None:
    """NEFTune: uniform noise in [-1, 1] * alpha / sqrt(seq_len * hidden) on the input embeddings, while the
    embedding module is in training mode only (never at eval, never in reference or Fisher passes)."""
    if alpha <= 0:
        return

    def noisy(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-1.0, 1.0) * scale

    model.get_input_embeddings().register_forward_hook(noisy)
