"""The QLoRA backend in one process, on real bitsandbytes 4-bit layers and peft LoRA (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from keeltune.config import Config, config_from_dict
from keeltune.distributed import ParallelEnv
from keeltune.eval.evaluate import token_nll
from keeltune.sharding.qlora import QLoraBackend, export_checkpoint, lora_config, write_merged
from keeltune.training.regularizers import RegularizerContext, build_regularizers
from keeltune.training.regularizers.lora_change import LoraChange
from tests.conftest import base_config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(assets: dict, tmp_path: Path, **qlora) -> Config:
    raw = base_config(assets, tmp_path, sharding={"backend": "qlora", "qlora": {"dropout": 0.0, **qlora}})
    return config_from_dict(raw)


def _backend(assets: dict, tmp_path: Path, **qlora) -> QLoraBackend:
    torch.manual_seed(0)
    return QLoraBackend(_config(assets, tmp_path, **qlora), ParallelEnv())


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (2, 33), generator=generator), torch.ones(2, 32)


def _loss_fn(ids: torch.Tensor, mask: torch.Tensor):
    return lambda logits: token_nll(logits, ids[:, 1:], mask) / mask.sum()


def _train(backend: QLoraBackend, steps: int, lr: float = 1e-2) -> None:
    backend.train(True)
    for step in range(steps):
        ids, mask = _batch(step)
        backend.forward_backward(ids[:, :-1], _loss_fn(ids, mask), sync_grads=True)
        backend.step(lr)


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _has_avx512_bf16() -> bool:
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text()


def test_only_lora_trains_on_a_4bit_base(assets: dict, tmp_path: Path) -> None:
    backend = _backend(assets, tmp_path)
    trainable = [n for n, p in backend.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    quantized = {n: m for n, m in backend.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted({n.split(".")[-2] for n in quantized}) == sorted(TARGETS) and len(quantized) == 2 * 7
    # packed 4-bit weights + their block scales (double quant: 8-bit scales + fp32 scales of those); the
    # 4-bit code book (16 or 256 floats) is one constant per layer and left out
    bytes_4bit = bytes_bf16 = 0
    for module in quantized.values():
        state = module.weight.quant_state
        bytes_4bit += module.weight.data.nbytes + state.absmax.nbytes + state.state2.absmax.nbytes
        bytes_bf16 += 2 * state.shape.numel()
    assert bytes_4bit / bytes_bf16 <= 0.30, bytes_4bit / bytes_bf16
    print(f"4-bit / bf16 bytes of the linear weights: {bytes_4bit / bytes_bf16:.4f}")


def _reference_grads(
    backend: QLoraBackend, config: Config, assets: dict, ids: torch.Tensor, mask: torch.Tensor
):
    """The same LoRA weights on an fp32 copy of the base whose linear weights are the dequantized 4-bit ones."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    linears = dict(plain.named_modules())
    with torch.no_grad():
        for name, module in backend.model.get_base_model().named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                linears[name.removesuffix(".base_layer")].weight.copy_(weight)
    reference = get_peft_model(plain, lora_config(config.sharding.qlora))
    reference.load_state_dict(
        {n: p.detach() for n, p in backend.model.named_parameters() if "lora_" in n}, strict=False
    )
    reference.train(True)
    logits = reference(input_ids=ids[:, :-1], use_cache=False).logits
    _loss_fn(ids, mask)(logits.float()).backward()
    return _lora_grads(reference)


def _gradients_after_eval(
    backend: QLoraBackend, ids: torch.Tensor, mask: torch.Tensor, *, kl_reference: bool = False
):
    torch.manual_seed(1)
    with torch.no_grad():  # random B as well as A, so that every LoRA weight gets a nonzero gradient
        for name, param in backend.model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
    backend.train(False)
    backend.logits(ids[:, :-1])  # what the trainer's evaluation does before training goes on
    backend.train(True)
    if kl_reference:  # the KL penalty's no-grad pass through the base with adapters disabled
        backend.reference_logits(ids[:, :-1])
    backend.forward_backward(ids[:, :-1], _loss_fn(ids, mask), sync_grads=True)
    return _lora_grads(backend.model)


def test_lora_gradients_after_an_eval_pass_match_a_dequantized_fp32_reference(
    assets: dict, tmp_path: Path
) -> None:
    ids, mask = _batch()
    config = _config(assets, tmp_path)
    backend = QLoraBackend(config, ParallelEnv())
    grads = _gradients_after_eval(backend, ids, mask)
    reference = _reference_grads(backend, config, assets, ids, mask)
    assert grads.keys() == reference.keys() and len(grads) == 2 * 2 * 7
    for name, grad in grads.items():  # 1e-4, not 1e-6: the 4-bit kernel and the dequantized fp32 matmul are
        # different computations (another summation order over the dequantized blocks)
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    worst_ok = max(float((grads[n] - reference[n]).norm() / reference[n].norm()) for n in reference)
    print(f"with the fix the worst relative gradient error is {worst_ok:.2e}")
    after_kl = _gradients_after_eval(QLoraBackend(config, ParallelEnv()), ids, mask, kl_reference=True)
    for name, grad in after_kl.items():  # same random adapters, so the same reference gradients
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=f"after KL pass: {name}")

    if _has_avx512_bf16():  # without the fix, the eval pass repacks the weights and gradients go wrong
        broken = _backend(assets, tmp_path)
        for module in broken.model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
        with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
            wrong = _gradients_after_eval(broken, ids, mask)
        worst = max(float((wrong[n] - reference[n]).norm() / reference[n].norm()) for n in reference)
        assert worst > 0.1, worst
        print(f"avx512_bf16: without the fix the worst relative gradient error is {worst:.3f}")


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_checkpoint_round_trip_holds_adapters_and_optimizer_only(assets: dict, tmp_path: Path) -> None:
    backend = _backend(assets, tmp_path, rank=4)
    _train(backend, 2)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    backend.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "optimizer.pt"]
    saved = load_file(folder / "adapter.safetensors")
    assert saved and all("lora_" in name for name in saved)
    # no base weights: the whole checkpoint is smaller than half of the base model's weights file
    assert _folder_bytes(folder) < 0.5 * (assets["model"] / "model.safetensors").stat().st_size

    restored = _backend(assets, tmp_path, rank=4)
    restored.load(folder)
    ids, _ = _batch(7)
    backend.train(False)
    restored.train(False)
    assert torch.equal(backend.logits(ids), restored.logits(ids))
    before, after = backend.optimizer.state_dict(), restored.optimizer.state_dict()
    assert before["param_groups"] == after["param_groups"] and len(after["state"]) == len(saved)
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after["state"][index][key]), (index, key)

    other_rank = _backend(assets, tmp_path, rank=8)
    with pytest.raises(ValueError, match="adapter.safetensors: adapter weights do not fit"):
        other_rank.load(folder)


def test_merged_export_loads_in_transformers_with_the_adapter_models_logits(
    assets: dict, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    config = _config(assets, tmp_path)
    torch.manual_seed(0)
    backend = QLoraBackend(config, ParallelEnv())
    _train(backend, 4)
    assert all(p.abs().max() > 0 for n, p in backend.model.named_parameters() if "lora_B" in n)
    backend.export(tmp_path / "final")
    model_config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "quantization_config" not in model_config
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()

    ids, _ = _batch(9)
    backend.train(False)
    expected = backend.logits(ids)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert merged.dtype == torch.float32
    with torch.no_grad():
        logits = merged(input_ids=ids, use_cache=False).logits
    difference = float((logits - expected).abs().max())
    print(f"merged vs 4-bit + adapter: max logit difference {difference:.2e}")
    assert difference < 1e-4

    sharded = tmp_path / "sharded"
    write_merged(backend.model, sharded, config.model.path, torch.float32, max_shard_bytes=64 * 1024)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(sharded).eval()(input_ids=ids, use_cache=False).logits
    assert float((logits - expected).abs().max()) < 1e-4

    # the offline export of a checkpoint writes the same merged weights, and the adapter
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    backend.save(checkpoint)
    written = export_checkpoint(config, checkpoint, tmp_path / "export", merge=True)
    assert written == [tmp_path / "export", tmp_path / "export" / "merged"]
    assert (tmp_path / "export" / "adapter_config.json").is_file()
    online, offline = (
        load_file(tmp_path / "final" / "model.safetensors"),
        load_file(written[1] / "model.safetensors"),
    )
    assert online.keys() == offline.keys()
    for name in online:
        assert torch.equal(online[name], offline[name]), name


def test_gradient_checkpointing_gives_the_same_lora_gradients(assets: dict, tmp_path: Path) -> None:
    ids, mask = _batch()
    plain = _gradients_after_eval(_backend(assets, tmp_path), ids, mask)
    raw = base_config(
        assets,
        tmp_path,
        model={"path": str(assets["model"]), "gradient_checkpointing": True},
        sharding={"backend": "qlora", "qlora": {"dropout": 0.0}},
    )
    torch.manual_seed(0)
    backend = QLoraBackend(config_from_dict(raw), ParallelEnv())
    assert backend.model.get_base_model().is_gradient_checkpointing
    checkpointed = _gradients_after_eval(backend, ids, mask)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-6, atol=1e-8, msg=name)


def test_kl_reference_is_the_base_without_adapters_and_l2sp_is_the_effective_weight_change(
    assets: dict, tmp_path: Path
) -> None:
    from peft.tuners.lora import LoraLayer

    raw = base_config(
        assets,
        tmp_path,
        sharding={"backend": "qlora", "qlora": {"dropout": 0.0}},
        regularization={"kl": {"weight": 1.0}, "l2sp": {"weight": 2.0}},
    )
    torch.manual_seed(0)
    config = config_from_dict(raw)
    backend = QLoraBackend(config, ParallelEnv(), keep_reference=True)
    (l2sp,) = [
        r
        for r in build_regularizers(RegularizerContext(config, backend, ParallelEnv(), tmp_path, {}))
        if r.name == "l2sp"
    ]
    assert isinstance(l2sp, LoraChange)
    ids, mask = _batch(3)
    backend.train(True)
    assert torch.equal(backend.reference_logits(ids), backend.logits(ids))  # B starts at zero
    backend.forward_backward(ids[:, :-1], _loss_fn(ids, mask), sync_grads=True)
    assert l2sp.add_gradients() == 0.0
    backend.step(1e-2)
    _train(backend, 2)
    assert backend.model.training
    assert float((backend.reference_logits(ids) - backend.logits(ids)).abs().max()) > 1e-4
    assert backend.model.training  # the reference pass restores the mode

    expected = 0.0
    with torch.no_grad():
        for module in backend.model.modules():
            if isinstance(module, LoraLayer):
                expected += float((module.get_delta_weight("default").float() ** 2).sum())
    before = {n: p.grad for n, p in backend.model.named_parameters() if p.requires_grad}
    assert all(g is None for g in before.values())
    value = l2sp.add_gradients()
    # 1e-5: the r x r form sums in another order than the explicit fp32 ||scale * B @ A||^2
    assert value == pytest.approx(2.0 / 2 * expected, rel=1e-5) and value > 0
    # its gradient against a finite difference of the explicit ||scale * B @ A||^2, on a few coordinates
    name, param = next((n, p) for n, p in backend.model.named_parameters() if "lora_A" in n)
    module = next(
        m for m in backend.model.modules() if isinstance(m, LoraLayer) and m.lora_A["default"].weight is param
    )

    @torch.no_grad()
    def explicit() -> float:
        return float((module.get_delta_weight("default").double() ** 2).sum())

    eps = 1e-3
    for index in [(0, 0), (1, 5), (3, 17)]:
        with torch.no_grad():
            param[index] += eps
            up = explicit()
            param[index] -= 2 * eps
            down = explicit()
            param[index] += eps
        assert float(param.grad[index]) == pytest.approx(2.0 / 2 * (up - down) / (2 * eps), rel=1e-2), index


@pytest.mark.parametrize(
    ("qlora", "regularization", "vocabulary", "match"),
    [
        (
            {"quant_type": "fp4"},
            {},
            {},
            r"sharding.qlora.shard_base: .*quant_type: nf4 and double_quant: true",
        ),
        ({"double_quant": False}, {}, {}, r"sharding.qlora.shard_base: .*double_quant: true"),
        (
            {},
            {"l2sp": {"weight": 1.0}},
            {},
            r"regularization.l2sp: not supported with sharding.qlora.shard_base",
        ),
        ({}, {}, {"new_tokens": 8}, r"model.extend_vocabulary: not supported with sharding.qlora.shard_base"),
    ],
)
def test_what_the_sharded_4bit_base_cannot_do_is_refused_at_config_time(
    assets: dict, tmp_path: Path, qlora: dict, regularization: dict, vocabulary: dict, match: str
) -> None:
    from keeltune.config import ConfigError

    raw = base_config(
        assets, tmp_path, sharding={"backend": "qlora", "qlora": {"shard_base": True, **qlora}},
        regularization=regularization,
    )  # fmt: skip
    if vocabulary:
        raw["model"]["extend_vocabulary"] = vocabulary
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_a_4bit_weight_that_does_not_split_into_whole_scale_groups_names_the_rank_counts_that_do() -> None:
    """NF4 keeps one int8 scale per 64 weights, in groups of 256: a rank's rows must be whole groups of 16384."""
    from keeltune.config import ConfigError
    from keeltune.config.backends import check_shardable

    check_shardable([[128, 256], [256, 128]], 2)  # 64 x 256 rows each: one group
    with pytest.raises(ConfigError, match=r"do not split into 3 equal row blocks.*one of \[1, 2\] ranks"):
        check_shardable([[128, 256]], 3)
    with pytest.raises(ConfigError, match=r"not whole groups of 16384 weights.*shard_base: false"):
        check_shardable([[64, 64]], 1)  # the test model's matrices: smaller than one group
