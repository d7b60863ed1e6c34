"""A staged run (continued pretraining on raw text, then fine-tuning) through the real CLI: one run folder and
W&B run, global step numbers, a new schedule and optimizer per stage, retention against the original base, and
an exact resume after a SIGKILL inside the second stage or right at the boundary."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keeltune.training.schedule import lr_at
from tests.conftest import base_config, keeltune, read_metrics, train_losses, wandb_history, write_config

CPT_STEPS, SFT_STEPS = 4, 4
STEPS = CPT_STEPS + SFT_STEPS


def staged_config(assets: dict, root: Path, name: str, every: int = 2, **extra: dict) -> dict:
    config = base_config(
        assets,
        root,
        run={"name": name, "root": str(root)},
        training={
            "max_steps": SFT_STEPS,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": every, "keep_last": 3},
        },
        regularization={"dropout": 0.1},  # the resumed RNG state matters
        eval={"every_steps": 2, "micro_batch_size": 8, "max_samples": 64},  # 745 retention samples: a few do
    )
    config["stages"] = [
        {
            "name": "cpt",
            "data": {"train": [{"name": "domain", "path": str(assets["general"])}]},
            "training": {"max_steps": CPT_STEPS, "lr": 1e-3, "warmup_steps": 2},
            **extra.get("cpt", {}),
        },
        {"name": "sft", "regularization": {"l2sp": {"weight": 0.01}}, **extra.get("sft", {})},
    ]
    return config


@pytest.fixture(scope="module")
def uninterrupted(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("staged")
    config = staged_config(assets, root / "runs", "straight")
    config["logging"] = {"wandb": {"mode": "offline", "project": "stages"}}
    done = keeltune("train", str(write_config(root / "cfg.yaml", config)))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "straight"


def test_stages_run_in_one_folder_with_global_steps_and_a_schedule_per_stage(uninterrupted: Path) -> None:
    rows = read_metrics(uninterrupted)
    trained = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(trained) == list(range(1, STEPS + 1))
    assert [trained[s]["train/stage"] for s in range(1, STEPS + 1)] == [0.0] * CPT_STEPS + [1.0] * SFT_STEPS
    # each stage its data and its own schedule: the learning rate warms up again from the stage's first step
    assert all("data/domain/fraction" in trained[s] for s in range(1, CPT_STEPS + 1))
    assert all("data/task/fraction" in trained[s] for s in range(CPT_STEPS + 1, STEPS + 1))
    cpt = dict(lr=1e-3, warmup_steps=2, max_steps=CPT_STEPS, min_lr_ratio=0.1)
    sft = dict(lr=3e-3, warmup_steps=1, max_steps=SFT_STEPS, min_lr_ratio=0.1)
    expected = [lr_at(i, **cpt) for i in range(CPT_STEPS)] + [lr_at(i, **sft) for i in range(SFT_STEPS)]
    assert [trained[s]["train/lr"] for s in range(1, STEPS + 1)] == pytest.approx(expected, rel=1e-12)
    # each stage its forgetting controls: L2-SP (anchored at the original base) only in sft
    assert not any("train/l2sp" in trained[s] for s in range(1, CPT_STEPS + 1))
    assert all(trained[s]["train/l2sp"] > 0 for s in range(CPT_STEPS + 1, STEPS + 1))
    # retention against the original base throughout: step 0's eval is the baseline of every later one
    evals = {r["step"]: r for r in rows if "retention/general/loss" in r}
    assert sorted(evals) == [0, 2, 4, 6, 8]
    base_ppl = evals[0]["retention/general/ppl"]
    for step in (2, 4, 6, 8):
        pct = 100 * (evals[step]["retention/general/ppl"] / base_ppl - 1)
        assert evals[step]["retention/general/forgetting_pct"] == pytest.approx(pct, abs=1e-4)
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == ["step_0000004", "step_0000006", "step_0000008"]
    state = json.loads((uninterrupted / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert (state["stage"], state["stage_start"]) == (
        0,
        0,
    )  # the boundary checkpoint is the first stage's end
    log = (uninterrupted / "logs" / "rank0.log").read_text()
    assert "stage cpt ended at step 4; stage sft starts (4 steps, fresh optimizer state)" in log
    assert (uninterrupted / "final" / "model.safetensors").is_file()
    # one W&B run for both stages, the stage marked on every step
    run_id = (uninterrupted / "wandb_run_id").read_text()
    (attempt,) = sorted((uninterrupted / "wandb").glob(f"offline-run-*-{run_id}"))
    history = [row for row in wandb_history(attempt / f"run-{run_id}.wandb") if "train/loss" in row]
    assert [float(row["train/stage"]) for row in history] == [0.0] * CPT_STEPS + [1.0] * SFT_STEPS


def _kill_after(cfg: Path, marker: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "keeltune.cli", "train", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize(
    ("every", "killed_after", "resumed_from"),
    [(2, 6, "step_0000006"), (4, 4, "step_0000004")],
    ids=["in-second-stage", "at-the-boundary"],
)
def test_a_run_killed_in_a_stage_resumes_exactly(
    assets: dict, tmp_path: Path, uninterrupted: Path, every: int, killed_after: int, resumed_from: str
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", staged_config(assets, tmp_path / "runs", "killed", every=every))
    run_dir = tmp_path / "runs" / "killed"
    _kill_after(cfg, run_dir / "checkpoints" / f"step_{killed_after:07d}" / "trainer_state.json")
    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {resumed_from}" in resumed.stderr
    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    reference, weights = (load_file(d / "final" / "model.safetensors") for d in (uninterrupted, run_dir))
    for name in reference:
        assert torch.allclose(weights[name], reference[name], atol=1e-6, rtol=0), name


def test_early_stopping_ends_a_stage_and_the_next_one_starts_there(assets: dict, tmp_path: Path) -> None:
    # no eval can improve val/loss by 100 nats: cpt ends at its first eval after step 0, sft runs in full
    stopping = {"regularization": {"early_stopping": {"patience": 1, "min_delta": 100.0}}}
    config = staged_config(assets, tmp_path / "runs", "early", cpt=stopping)
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "early"
    trained = {r["step"]: r["train/stage"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert trained == {1: 0.0, 2: 0.0, **{s: 1.0 for s in range(3, 3 + SFT_STEPS)}}
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "stage cpt ended at step 2 after checkpointing: early stopping: val/loss did not improve" in log
    assert "stage sft starts (4 steps" in log


def test_a_domain_vocabulary_is_learned_from_the_first_stage_and_trained_in_both(
    assets: dict, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = staged_config(assets, tmp_path / "runs", "vocab")
    config["model"]["extend_vocabulary"] = {"new_tokens": 24, "min_count": 5, "min_pieces": 3}
    config["stages"][1]["regularization"] = {"kl": {"weight": 0.5}}  # compared on the base vocabulary's rows
    cfg = write_config(tmp_path / "cfg.yaml", config)
    prepared = keeltune("prepare", str(cfg))
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "domain vocabulary: 24 new tokens in" in prepared.stdout
    done = keeltune("train", str(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "vocab"
    report = json.loads((run_dir / "base_model" / "keeltune_vocabulary.json").read_text())
    base_size = report["base_vocab_size"]
    assert report["sources"] == ["domain"] and len(report["tokens"]) == 24
    per_document = report["tokens_per_document"]
    assert per_document["after"] < per_document["before"]
    rows = read_metrics(run_dir)
    trained = {r["step"]: r for r in rows if "train/loss" in r}
    assert all(0 < trained[s]["train/kl"] < 10 for s in range(CPT_STEPS + 1, STEPS + 1))
    logged = next(r for r in rows if "vocab/new_tokens" in r)  # in metrics.jsonl and W&B, at step 0
    assert logged["step"] == 0 and logged["vocab/tokens_per_document_after"] == per_document["after"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", local_files_only=True)
    assert len(tokenizer) == base_size + 24 == model.get_input_embeddings().weight.shape[0]
    new = [t["id"] for t in report["tokens"]]
    text = report["tokens"][0]["text"]
    assert tokenizer.encode(text, add_special_tokens=False) == [new[0]]
    base = load_file(run_dir / "base_model" / "model.safetensors")["model.embed_tokens.weight"]
    final = load_file(run_dir / "final" / "model.safetensors")["model.embed_tokens.weight"]
    pieces = report["tokens"][0]["pieces"]
    assert torch.allclose(base[new[0]], base[pieces].mean(0))  # started at the mean of its pieces
    assert not torch.equal(final[new], base[new])  # and trained
    # WiSE-FT from the extended base: every row, the new ones from their initial mean
    half = keeltune("export", str(run_dir), "--out", str(tmp_path / "half"), "--interpolate", "0.5")
    assert half.returncode == 0, half.stderr[-3000:]
    exported = load_file(tmp_path / "half" / "model.safetensors")
    midway = exported.get("model.embed_tokens.weight", exported.get("lm_head.weight"))  # tied: one is written
    assert torch.allclose(midway, (base + final) / 2, atol=1e-6)
