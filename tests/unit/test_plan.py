"""The DeepSpeed config is generated from the typed config and the model's size, never written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeltune.config import ConfigError, config_from_dict
from keeltune.config.plan import deepspeed_config, model_hidden_size
from tests.conftest import keeltune, write_config


def _config(tmp_path: Path, **zero3: object) -> dict:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 512}))
    return {
        "run": {"name": "plan", "root": str(tmp_path / "runs")},
        "model": {"path": str(model)},
        "data": {"train": [{"name": "t", "path": str(tmp_path / "t.jsonl")}]},
        "training": {"global_batch_size": 32, "micro_batch_size": 2, "grad_clip": 0.5, "precision": "bf16"},
        "sharding": {"backend": "zero3", "zero3": zero3},
    }


def test_sizes_follow_the_hidden_size_unless_set(tmp_path: Path) -> None:
    config = config_from_dict(_config(tmp_path))
    hidden = model_hidden_size(config.model.path)
    generated = deepspeed_config(config, 4, bf16=True, hidden_size=hidden)
    zero = generated["zero_optimization"]
    assert hidden == 512 and zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 512 * 512
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 512 * 512)
    assert zero["stage3_param_persistence_threshold"] == 5120
    one = deepspeed_config(config, 1, bf16=True, hidden_size=hidden)["zero_optimization"]
    assert one["stage3_param_persistence_threshold"] >= 10**12  # one rank: nothing to partition
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert generated["gradient_accumulation_steps"] == 4  # 32 = 2 x 4 ranks x 4
    assert generated["train_batch_size"] == 32 and generated["gradient_clipping"] == 0.5
    assert generated["bf16"] == {"enabled": True}

    tuned = config_from_dict(
        _config(tmp_path, param_persistence_threshold=0, offload_optimizer="cpu", offload_params="cpu")
    )
    zero = deepspeed_config(tuned, 8, bf16=False, hidden_size=hidden)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="cannot be made from micro_batch_size=2 x 3 ranks"):
        deepspeed_config(tuned, 3, bf16=False, hidden_size=hidden)


def test_keeltune_config_shows_the_generated_deepspeed_json(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", _config(tmp_path))
    done = keeltune("config", str(cfg), "--nproc", "8")
    assert done.returncode == 0, done.stderr
    block = done.stdout.split("# DeepSpeed config generated for 8 rank(s):\n", 1)[1]
    shown = json.loads("\n".join(line.removeprefix("#   ") for line in block.splitlines()))
    assert shown["gradient_accumulation_steps"] == 2
    assert shown["zero_optimization"]["reduce_bucket_size"] == 512 * 512


def test_memory_estimate_counts_each_regularizers_copies_per_backend(tmp_path: Path) -> None:
    """A 1000-parameter header-only model: the regularizers' line is the base copy, anchors and Fisher (divided
    over ranks under zero3) plus the reference logits, and absent when no penalty is on."""
    from keeltune.config.plan import estimate_gpu_memory

    tree = _config(tmp_path)
    model = Path(tree["model"]["path"])
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 2, "vocab_size": 100})
    )
    header = json.dumps({"w": {"dtype": "F32", "shape": [10, 100], "data_offsets": [0, 4000]}}).encode()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4000))
    tree["data"]["seq_len"] = 10
    logits = 4.0 * 2 * 10 * 100  # fp32 reference logits of one micro-batch (2 x 10 tokens, vocab 100)
    line = "regularizers (base copy, anchors, Fisher, reference logits)"
    for backend, regularization, ranks, expected in (
        ("zero3", {"kl": {"weight": 1.0}, "l2sp": {"weight": 1.0}}, 4, (2 + 4) * 1000 / 4 + logits),
        ("ddp", {"kl": {"weight": 1.0}, "l2sp": {"weight": 1.0}}, 4, 4 * 1000 + logits),
        ("ddp", {"ewc": {"weight": 1.0}}, 1, 8 * 1000),
        ("qlora", {"kl": {"weight": 1.0}}, 1, logits),
    ):
        tree["sharding"] = {"backend": backend}
        tree["regularization"] = regularization
        tree["data"]["retention"] = [{"name": "g", "path": str(tmp_path / "g.jsonl")}]
        parts = estimate_gpu_memory(config_from_dict(tree), ranks)
        assert parts[line] * 1024**3 == pytest.approx(expected), (backend, regularization)
    tree["regularization"] = {}
    assert line not in estimate_gpu_memory(config_from_dict(tree), 1)
