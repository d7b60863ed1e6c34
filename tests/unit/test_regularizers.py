"""The regularizers' math on the tiny model: KL to the base, L2-SP, EWC (Fisher saved and reused), NEFTune."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import keeltune.training.regularizers.ewc as ewc_module
from keeltune.config import Config, config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.base import LocalParameter
from keeltune.sharding.ddp import DDPBackend
from keeltune.training.regularizers import (
    Regularizer,
    RegularizerContext,
    build_regularizers,
    needs_reference,
)
from keeltune.training.regularizers.ewc import EWC, FISHER_FILE
from keeltune.training.regularizers.kl import token_kl
from keeltune.training.regularizers.l2sp import L2SP
from keeltune.training.trainer import Trainer
from tests.conftest import base_config


def _ddp(assets: dict, tmp_path: Path, **regularization) -> tuple[DDPBackend, dict[str, Regularizer]]:
    """A DDP backend built as the trainer builds it, and its regularizers by name."""
    config = config_from_dict(base_config(assets, tmp_path, regularization=regularization))
    torch.manual_seed(0)
    backend = DDPBackend(config, ParallelEnv(), keep_reference=needs_reference(config))
    context = RegularizerContext(config, backend, ParallelEnv(), tmp_path, {})
    return backend, {r.name: r for r in build_regularizers(context)}


class TensorView:
    """The backend view over plain tensors: what a regularizer sees, without a model."""

    partitioned = False

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.grads = {n: torch.zeros_like(t) for n, t in tensors.items()}

    def local_parameters(self) -> list[LocalParameter]:
        return [LocalParameter(n, t, self.grads[n].add_) for n, t in self.tensors.items()]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (2, 33), generator=generator), torch.ones(2, 32)


def _step(backend: DDPBackend, seed: int = 0, lr: float = 1e-2) -> None:
    ids, mask = _batch(seed)
    backend.train(True)
    backend.forward_backward(ids[:, :-1], lambda lg: token_nll(lg, ids[:, 1:], mask) / 64, sync_grads=True)
    backend.step(lr)


def test_kl_is_zero_for_equal_logits_and_matches_a_hand_computation() -> None:
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])
    reference = torch.tensor([[[0.5, 1.0, 1.5], [2.0, 0.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0]])  # the second token is no target
    assert float(token_kl(logits, logits, torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-7)

    def by_hand(z: list[float], r: list[float], t: float) -> float:
        q = [math.exp(v / t) / sum(math.exp(u / t) for u in z) for v in z]
        p = [math.exp(v / t) / sum(math.exp(u / t) for u in r) for v in r]
        return t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    for temperature in (1.0, 2.0):
        expected = by_hand(logits[0, 0].tolist(), reference[0, 0].tolist(), temperature)
        assert float(token_kl(logits, reference, mask, temperature)) == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: token_kl(z, reference, mask, 1.5), (logits,))


def test_l2sp_and_ewc_on_the_view_add_the_gradient_of_their_value(assets: dict, tmp_path: Path) -> None:
    """On any backend's view: the value is 1/2 w sum (F) d^2, the added gradient its finite difference."""
    torch.manual_seed(0)
    config: Config = config_from_dict(
        base_config(assets, tmp_path, regularization={"l2sp": {"weight": 0.5}, "ewc": {"weight": 3.0}})
    )
    pretrained = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(5, dtype=torch.float64)}
    view = TensorView({n: t.clone() for n, t in pretrained.items()})
    context = RegularizerContext(config, view, ParallelEnv(), tmp_path, {})
    l2sp, ewc = L2SP(context), EWC(context)
    fisher = {n: torch.rand_like(t) for n, t in pretrained.items()}
    ewc.fisher = fisher
    assert l2sp.add_gradients() == 0.0 == ewc.add_gradients()
    with torch.no_grad():
        for tensor in view.tensors.values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    change = {n: view.tensors[n] - pretrained[n] for n in pretrained}
    for regularizer, expected in (
        (l2sp, 0.5 * 0.5 * sum(float((d**2).sum()) for d in change.values())),
        (ewc, 0.5 * 3.0 * sum(float((fisher[n] * d**2).sum()) for n, d in change.items())),
    ):
        view.grads = {n: torch.zeros_like(t) for n, t in view.tensors.items()}
        assert regularizer.add_gradients() == pytest.approx(expected, rel=1e-12)
        added = {n: g.clone() for n, g in view.grads.items()}
        eps = 1e-6
        for name, index in (("a", (1, 2)), ("b", (4,))):
            with torch.no_grad():
                view.tensors[name][index] += eps
                up = regularizer.add_gradients()
                view.tensors[name][index] -= 2 * eps
                down = regularizer.add_gradients()
                view.tensors[name][index] += eps
            assert float(added[name][index]) == pytest.approx((up - down) / (2 * eps), rel=1e-6), index


def test_kl_to_the_frozen_base_is_zero_before_training_and_positive_after(
    assets: dict, tmp_path: Path
) -> None:
    backend, _ = _ddp(assets, tmp_path, kl={"weight": 1.0})
    ids, mask = _batch(5)
    ids = ids[:, :-1]
    backend.train(True)
    assert float(token_kl(backend.logits(ids), backend.reference_logits(ids), mask)) == pytest.approx(
        0.0, abs=1e-6
    )
    assert all(not p.requires_grad for p in backend.reference.parameters()) and not backend.reference.training
    _step(backend)
    assert float(token_kl(backend.logits(ids), backend.reference_logits(ids), mask)) > 1e-4


def test_l2sp_is_zero_at_the_pretrained_weights_and_adds_w_times_the_change_to_the_gradient(
    assets: dict, tmp_path: Path
) -> None:
    weight = 0.5
    backend, regularizers = _ddp(assets, tmp_path, l2sp={"weight": weight})
    pretrained = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    assert regularizers["l2sp"].add_gradients() == 0.0
    _step(backend)
    _step(backend, seed=1)
    params = dict(backend.model.named_parameters())
    assert all(p.grad is None for p in params.values())  # the step zeroed them
    expected = (
        0.5
        * weight
        * sum(float(((p.detach().double() - pretrained[n]) ** 2).sum()) for n, p in params.items())
    )
    value = regularizers["l2sp"].add_gradients()
    assert value == pytest.approx(expected, rel=1e-9) and value > 0
    for name, param in params.items():
        torch.testing.assert_close(param.grad, weight * (param.detach() - pretrained[name]), rtol=0, atol=0)


def test_neftune_noise_has_the_paper_scale_in_training_and_none_in_eval(assets: dict, tmp_path: Path) -> None:
    alpha = 5.0
    backend, _ = _ddp(assets, tmp_path, neftune_alpha=alpha)
    embedding = backend.model.get_input_embeddings()
    ids, _ = _batch()
    clean = torch.nn.functional.embedding(ids, embedding.weight).detach()
    backend.train(False)
    assert torch.equal(embedding(ids), clean)
    backend.train(True)
    noise = (embedding(ids) - clean).detach()
    scale = alpha / math.sqrt(ids.shape[1] * embedding.weight.shape[1])
    assert float(noise.abs().max()) <= scale * (1 + 1e-5)
    assert float(noise.std()) == pytest.approx(scale / math.sqrt(3.0), rel=0.05)  # uniform in [-scale, scale]


def test_ewc_fisher_is_positive_saved_and_reused_on_resume(
    assets: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = base_config(assets, tmp_path, regularization={"ewc": {"weight": 10.0, "samples": 6}})
    raw["eval"]["at_start"] = False
    trainer = Trainer(config_from_dict(raw), ParallelEnv())
    path = trainer.run_dir / FISHER_FILE
    fisher = load_file(path)
    params = {n for n, p in trainer.backend.model.named_parameters() if p.requires_grad}
    assert fisher.keys() == params and all(float(t.min()) >= 0 for t in fisher.values())
    assert sum(float(t.sum()) for t in fisher.values()) > 0
    ewc = next(r for r in trainer.regularizers if r.name == "ewc")
    assert ewc.add_gradients() == 0.0
    trainer.train_one_step()
    trainer._checkpoint()
    assert ewc.add_gradients() > 0
    trainer.close()

    def no_estimate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Fisher was estimated again on resume")

    monkeypatch.setattr(ewc_module, "estimate_fisher", no_estimate)
    resumed = Trainer(config_from_dict(raw), ParallelEnv())
    assert resumed.step == 1
    resumed_ewc = next(r for r in resumed.regularizers if r.name == "ewc")
    for name, tensor in fisher.items():
        assert torch.equal(resumed_ewc.fisher[name], tensor), name
    resumed.close()
    path.unlink()
    with pytest.raises(FileNotFoundError, match="can only be estimated at the pretrained weights"):
        Trainer(config_from_dict(raw), ParallelEnv())


def test_retention_guard_warn_alerts_wandb_and_trains_on(
    assets: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = base_config(
        assets,
        tmp_path,
        regularization={"retention_guard": {"max_forgetting_pct": 25.0}, "early_stopping": {"patience": 2}},
    )
    trainer = Trainer(config_from_dict(raw), ParallelEnv())
    alerts = []

    class FakeRun:
        def alert(self, title: str, text: str) -> None:
            alerts.append((title, text))
            raise ConnectionError("W&B unreachable")  # an alert that fails must not stop training

    trainer.metrics.wandb_run = FakeRun()
    results = {
        "val/loss": 2.0,
        "retention/general/forgetting_pct": 30.0,
        "retention/other/forgetting_pct": 10.0,
    }
    with caplog.at_level("WARNING", logger="keeltune"):
        assert trainer._watch(results) == ""
    assert len(alerts) == 1 and "retention/general/forgetting_pct 30.0%" in alerts[0][1]
    assert "retention/other" not in alerts[0][1]
    assert "retention guard: retention/general/forgetting_pct 30.0% above" in caplog.text
    assert "W&B alert failed: W&B unreachable" in caplog.text
    trainer.metrics.wandb_run = None
    # early stopping counts evals without improvement, and its state round-trips through a checkpoint
    trainer.step = 2
    assert trainer._watch({"val/loss": 2.5}) == "" and trainer.policy.early_stopping.bad_evals == 1
    state = trainer._trainer_state()["early_stopping"]
    assert state == {"best": 2.0, "best_step": 0, "bad_evals": 1}
    assert "patience" in trainer._watch({"val/loss": 2.4})
    trainer.close()


def test_l2sp_with_kl_shares_the_frozen_copy_instead_of_a_third_copy(assets: dict, tmp_path: Path) -> None:
    backend, regularizers = _ddp(assets, tmp_path, kl={"weight": 1.0}, l2sp={"weight": 1.0})
    frozen = dict(backend.reference.named_parameters())
    anchors = regularizers["l2sp"].anchors
    assert anchors and all(t is frozen[n] for n, t in anchors.items())
    _step(backend)
    assert regularizers["l2sp"].add_gradients() > 0  # the anchors did not move with the model
