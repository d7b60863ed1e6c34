"""QLoRA on a sharded 4-bit base (``sharding.qlora.shard_base``: torchao NF4 under FSDP2) over gloo processes:
each rank holds half of the 4-bit base, the LoRA gradients equal one rank's, the states each rank holds match
the dry-run estimate, and a 2-rank run through the CLI trains, resumes on one rank and exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import base_config, keeltune, read_metrics, train_losses, write_config

STEPS = 4


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose block matrices split into whole NF4 scale groups over 1 and 2 ranks (the test model's
    64 x 64 ones are smaller than one group of 16384 weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("small") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512,
        )
    ).save_pretrained(folder)  # fmt: skip
    return folder


def sharded_config(assets: dict, model: Path, root: Path, name: str) -> dict:
    config = base_config(
        assets,
        root,
        run={"name": name, "root": str(root)},
        training={
            "max_steps": STEPS, "global_batch_size": 4, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 1,
            "checkpoint": {"every_steps": 2, "keep_last": 2},
        },
        eval={"every_steps": STEPS, "micro_batch_size": 4},
        sharding={"backend": "qlora", "qlora": {"rank": 4, "dropout": 0.0, "shard_base": True, "compute_dtype": "fp32"}},
        regularization={"kl": {"weight": 0.5}},
    )  # fmt: skip
    config["model"] = {"path": str(model), "tokenizer": str(assets["model"])}
    config["data"]["prepare_workers"] = 1
    return config


def _probe(cfg: Path, ranks: int, out: Path) -> list[dict]:
    probe = Path(__file__).with_name("qlora_sharded_probe.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(probe),
         str(cfg), str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(found) for found in re.findall(r"QLORA_SHARDED_PROBE (\{[^{}]*\})", done.stdout)]


def test_each_rank_holds_half_the_4bit_base_and_lora_gradients_equal_one_ranks(
    assets: dict, small_model: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", sharded_config(assets, small_model, tmp_path / "runs", "probe"))
    one, two = _probe(cfg, 1, tmp_path / "g1.safetensors"), _probe(cfg, 2, tmp_path / "g2.safetensors")
    assert len(one) == 1 and sorted(r["rank"] for r in two) == [0, 1]
    assert one[0]["held_4bit"] == pytest.approx(one[0]["whole_4bit"], rel=1e-3)
    for report in two:
        print(f"rank {report['rank']}: {report['held_4bit'] / report['whole_4bit']:.4f} of the 4-bit base, "
              f"states {report['held_states']} B against an estimate of {report['estimate']:.0f} B")  # fmt: skip
        assert abs(report["held_4bit"] / report["whole_4bit"] - 0.5) <= 0.01
    for report in one + two:
        assert abs(report["held_states"] / report["estimate"] - 1) <= 0.15, report
    whole, halves = load_file(tmp_path / "g1.safetensors"), load_file(tmp_path / "g2.safetensors")
    assert (
        whole.keys() == halves.keys() and len(whole) == one[0]["adapters"] == 2 * 7 * 2
    )  # A and B, 7 a block
    assert all("lora_" in name for name in whole)
    for name, grad in whole.items():
        scale = grad.abs().max()
        assert scale > 0 or "lora_A" in name, name  # B starts at zero: only its gradient is non-zero at first
        assert float((halves[name] - grad).abs().max()) <= 1e-6 * max(float(scale), 1e-12) + 1e-12, name


def test_two_ranks_train_resume_on_one_and_export(assets: dict, small_model: Path, tmp_path: Path) -> None:
    """A 2-rank run through the CLI (KL to the base: the adapters toggled off and on under FSDP2), resumed from
    its step-2 checkpoint on one rank: the same losses after it; the merged export computes what final/ does.
    (The LoRA gradients of 2 ranks against one rank's: the probe test above.)"""
    runs = tmp_path / "runs"
    three_ranks = sharded_config(assets, small_model, runs, "three")
    three_ranks["training"]["global_batch_size"] = 6  # a batch 3 ranks can make
    three = write_config(tmp_path / "three.yaml", three_ranks)
    refused = keeltune("train", str(three), "--nproc", "3")  # 3 does not divide the 128-row k/v matrices
    assert refused.returncode == 2 and "train on one of [1, 2] ranks" in refused.stderr, refused.stderr[
        -2000:
    ]
    assert not (runs / "three").exists()  # refused before the run folder or any rank
    cfg = write_config(tmp_path / "two.yaml", sharded_config(assets, small_model, runs, "two"))
    done = keeltune("train", str(cfg), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = train_losses(runs / "two")
    assert uninterrupted[STEPS] < uninterrupted[1]
    assert all(r["train/kl"] >= 0 for r in read_metrics(runs / "two") if "train/kl" in r)
    checkpoint = runs / "two" / "checkpoints" / f"step_{STEPS:07d}"
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert {"adapter.safetensors", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(files)
    adapters = load_file(checkpoint / "adapter.safetensors")
    assert len(adapters) == 2 * 7 * 2 and all("lora_" in name for name in adapters)  # every block's, whole
    (runs / "two" / "final").rename(tmp_path / "final_two")
    shutil.rmtree(checkpoint)
    metrics = runs / "two" / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= 2]
    metrics.write_text("".join(line + "\n" for line in kept))
    resumed = keeltune("train", str(cfg), "--nproc", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = train_losses(runs / "two")
    for step in range(3, STEPS + 1):
        assert abs(again[step] - uninterrupted[step]) <= 1e-5, (step, again[step], uninterrupted[step])
    out = tmp_path / "export"
    done = keeltune("export", str(runs / "two"), "--out", str(out), "--merge")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True).eval()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final_two", local_files_only=True).eval()
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():  # final/ of the 2-rank run against the export of the run resumed on one rank
        assert torch.allclose(merged(input_ids=ids).logits, final(input_ids=ids).logits, atol=1e-5)
