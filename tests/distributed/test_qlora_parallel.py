"""QLoRA data parallel over 2 real gloo processes (the CLI, torch's launcher) equals 1 process on the same global
batch; the ranks read different samples but end with identical adapters; the run exports and merges; a run
SIGKILLed after a checkpoint resumes to the uninterrupted run's adapters."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from keeltune.config import config_from_dict
from keeltune.data_pipeline.reader import PackedDataset, TrainStream
from tests.conftest import REPO, SharedRun, keeltune, read_metrics, train_losses, write_config
from tests.distributed.conftest import QLORA_STEPS, qlora_run_config

STEPS = QLORA_STEPS
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+), (\d+) samples consumed\)")


def _run_config(assets: dict, tmp_path: Path, name: str) -> dict:
    return qlora_run_config(assets, tmp_path, name)


def _evals(run_dir: Path) -> dict[str, float]:
    """The evaluation after the last step (the one at step 0 is the base model's)."""
    return next(r for r in read_metrics(run_dir) if r["step"] == STEPS and "val/loss" in r)


@pytest.fixture(scope="module")
def runs(qlora_run: SharedRun, assets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same QLoRA run on 1 (the session's, read-only: copy it to write) and on 2 ranks."""
    tmp_path = tmp_path_factory.mktemp("qlora_runs")
    config = _run_config(assets, tmp_path, "ranks2")
    done = keeltune("train", str(write_config(tmp_path / "cfg2.yaml", config)), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return {1: qlora_run.run_dir, 2: tmp_path / "runs" / "ranks2"}


def test_two_ranks_match_one_rank_on_different_samples(runs: dict[int, Path], assets: dict) -> None:
    one, two = train_losses(runs[1]), train_losses(runs[2])
    assert sorted(two) == list(range(1, STEPS + 1))
    # within 1e-6, not to the bit: 2 ranks sum each step's adapter gradients in another order than 1 rank.
    # Seen: losses within 1.2e-7, adapters within 1.4e-7, evaluation within 1.1e-7.
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-6, (step, one[step], two[step])
    reference = load_file(runs[1] / "final" / "adapter" / "adapter_model.safetensors")
    adapter = load_file(runs[2] / "final" / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == adapter.keys() and all("lora_" in name for name in adapter)
    for name in reference:
        assert torch.allclose(reference[name], adapter[name], atol=1e-6, rtol=0), name
    # evaluation is sharded (rank 1 scores every second sample with its own replica): equal to one rank's, on the
    # 4-bit base before training and after the last step
    evals = {n: [r for r in read_metrics(runs[n]) if "val/loss" in r] for n in (1, 2)}
    assert [r["step"] for r in evals[1]] == [r["step"] for r in evals[2]] == [0, STEPS]
    for expected, got in zip(evals[1], evals[2], strict=True):
        for key, value in expected.items():
            if key.endswith("/loss"):
                assert abs(got[key] - value) <= 1e-6, (expected["step"], key, got[key], value)
    assert "[rank1/" in (runs[2] / "logs" / "rank1.log").read_text()

    # the ranks read disjoint halves of every global batch (the stream the trainer reads, on the run's data)
    run_config = config_from_dict(_run_config(assets, runs[2].parents[1], "ranks2"))
    (_, _, folder), *_ = run_config.data.prepared_sets(runs[2])
    dataset = PackedDataset(folder)
    streams = [TrainStream([dataset], global_batch=8, rank=r, world_size=2, seed=0) for r in (0, 1)]
    whole = TrainStream([dataset], global_batch=8, rank=0, world_size=1, seed=0)
    for _ in range(STEPS):
        shares = [stream.next_batch()[0] for stream in streams]
        assert not set(shares[0]) & set(shares[1])
        assert np.array_equal(np.concatenate(shares), whole.next_batch()[0])


def test_export_merges_the_adapters_into_a_plain_transformers_folder(
    runs: dict[int, Path], tmp_path: Path
) -> None:
    out = tmp_path / "export"
    done = keeltune("export", str(runs[2]), "--out", str(out), "--merge")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    merged_model = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged_model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[:2] == (1, 3)
    merged, final = (
        load_file(out / "merged" / "model.safetensors"),
        load_file(runs[2] / "final" / "model.safetensors"),
    )
    for name in final:
        assert torch.equal(merged[name], final[name]), name


def test_ranks_get_different_gradients_and_keep_identical_adapters(assets: dict, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", _run_config(assets, tmp_path, "ranks"))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "tests.distributed.qlora_ranks", str(config), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    local = [name for name in rank0 if name.startswith("local_grad.")]
    synced = [name for name in rank0 if name.startswith("synced_grad.")]
    weights = [name for name in rank0 if name.startswith("weight.")]
    assert local and synced and weights and all("lora_" in name for name in weights)
    # the gradients are real: LoRA's B starts at zero, so only the first step's A gradients are zero (nothing
    # flows through A yet); every other gradient, local and synced, is non-zero on both ranks (a backward that
    # dropped them, as bitsandbytes' inference kernel does silently, would leave them all zero)
    first_a = {name for name in local + synced if name.split(".")[1] == "0" and ".lora_A." in name}
    assert first_a and any(".lora_B." in name for name in weights)
    for name in local + synced:
        for rank in (rank0, rank1):
            assert bool(rank[name].any()) == (name not in first_a), name
    assert all(rank0[name].any() for name in weights if ".lora_B." in name)  # B moved off zero
    # before the all-reduce each rank's gradient comes from its own samples ...
    assert all(not torch.equal(rank0[name], rank1[name]) for name in local if name not in first_a)
    # ... after it, and in the weights the optimizer makes from it, the ranks agree bit for bit
    for name in synced + weights:
        assert torch.equal(rank0[name], rank1[name]), name


def test_a_deleted_adapter_falls_back_to_the_previous_checkpoint(
    runs: dict[int, Path], assets: dict, tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs" / "ranks1"
    shutil.copytree(runs[1], run_dir)
    (run_dir / "checkpoints" / f"step_{STEPS:07d}" / "adapter.safetensors").unlink()
    config = _run_config(assets, tmp_path, "ranks1")
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"checkpoint step_{STEPS:07d} is damaged: adapter.safetensors: missing" in log, log[-3000:]
    expected, got = train_losses(runs[1]), train_losses(run_dir)
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
rename = os.replace
def rename_then_die(source, target, *args, **kwargs):
    rename(source, target, *args, **kwargs)
    if os.path.basename(os.fsdecode(target)) == sys.argv[2]:  # that checkpoint is complete (renamed into place)
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = rename_then_die
from keeltune.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_adapters(
    runs: dict[int, Path], assets: dict, tmp_path: Path
) -> None:
    """The 1-rank run of the fixture again, SIGKILLed the moment its step-2 checkpoint is complete (one rank
    trains in the CLI's own process), then resumed: the steps after the resume and the final adapters equal the
    uninterrupted run's (the same rank count, the same reduction order: to the bit)."""
    cfg = write_config(tmp_path / "cfg.yaml", _run_config(assets, tmp_path, "killed"))
    run_dir = tmp_path / "runs" / "killed"
    kill_at = f"step_{STEPS // 2:07d}"
    died = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(cfg), kill_at],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    # killed between the checkpoint and the next step: nothing after step 2 exists yet
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [kill_at]
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS // 2 + 1))
    assert not (run_dir / "final").exists()

    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    found = RESUMED.findall(log)
    assert len(found) == 1, log[-3000:]
    assert Path(found[0][0]).name == kill_at and int(found[0][1]) == STEPS // 2, found
    expected, got = train_losses(runs[1]), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    assert abs(_evals(run_dir)["val/loss"] - _evals(runs[1])["val/loss"]) <= 1e-6
    for weights in ("adapter/adapter_model.safetensors", "model.safetensors"):  # the adapters, and merged
        reference, resumed_weights = (
            load_file(runs[1] / "final" / weights),
            load_file(run_dir / "final" / weights),
        )
        assert reference.keys() == resumed_weights.keys()
        for name in reference:
            assert torch.equal(resumed_weights[name], reference[name]), (weights, name)
