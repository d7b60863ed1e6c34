"""The real CLI on a tiny model: a run folder, exact resume after SIGKILL, and crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, base_config, keeltune, read_metrics, train_losses, write_config

STEPS = 24


def resume_config(assets: dict, root: Path, name: str) -> dict:
    # dropout on, so the resumed RNG state matters; eval and checkpoints every 4 steps
    return base_config(
        assets,
        root,
        run={"name": name, "root": str(root)},
        training={
            "max_steps": STEPS,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "checkpoint": {"every_steps": 4, "keep_last": 2},
        },
        regularization={"dropout": 0.1, "weight_decay": 0.01},
        # bias probes against the base at step 0: a resumed run compares with the same base scores
        eval={
            "every_steps": 4,
            "micro_batch_size": 8,
            "bias": {"probes": [{"kind": "pairs", "axes": ["gender"], "max_items_per_axis": 8}]},
        },
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    cfg = write_config(root / "cfg.yaml", resume_config(assets, root / "runs", "straight"))
    done = keeltune("train", str(cfg))
    assert done.returncode == 0, done.stderr
    return root / "runs" / "straight"


def test_run_folder_holds_config_checkpoints_metrics_and_a_loadable_model(uninterrupted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (uninterrupted / "config.yaml").is_file()
    steps = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert steps == ["step_0000020", "step_0000024"]  # keep_last: 2
    losses = train_losses(uninterrupted)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(list(losses.values())[-4:]) / 4 < sum(list(losses.values())[:4]) / 4  # it learns
    evals = [r for r in read_metrics(uninterrupted) if "val/loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12, 16, 20, 24]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]
    assert "retention/general/forgetting_pct" in evals[-1]
    umask = os.umask(0)
    os.umask(umask)
    for shared in (uninterrupted / "final", uninterrupted / "checkpoints" / "step_0000024"):
        for path in shared.iterdir():  # readable by colleagues as the umask says (safetensors writes 0600)
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    model = AutoModelForCausalLM.from_pretrained(uninterrupted / "final", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(uninterrupted / "final", local_files_only=True)
    ids = torch.tensor([tokenizer.encode("What is the type of the value 3")])
    assert model(ids).logits.shape[-1] == len(tokenizer)


def _start_training(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keeltune.cli", "train", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(
    assets: dict, tmp_path: Path, uninterrupted: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", resume_config(assets, tmp_path / "runs", "killed"))
    run_dir = tmp_path / "runs" / "killed"
    process = _start_training(cfg)
    _wait_for(run_dir / "checkpoints" / "step_0000008" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step_00000" in resumed.stderr
    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    assert sorted(got) == list(
        range(1, STEPS + 1)
    )  # records of the killed attempt after the checkpoint were dropped
    for step in range(1, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    reference, weights = final_weights(uninterrupted), final_weights(run_dir)
    assert reference.keys() == weights.keys()
    for name in reference:
        assert torch.allclose(weights[name], reference[name], atol=1e-6, rtol=0), name
    bias = "bias/pairs/gender/likelihood_gap_amplification"
    expected_bias = {r["step"]: r[bias] for r in read_metrics(uninterrupted) if bias in r}
    got_bias = {r["step"]: r[bias] for r in read_metrics(run_dir) if bias in r}
    assert sorted(got_bias) == sorted(expected_bias) == list(range(0, STEPS + 1, 4))
    for step, value in expected_bias.items():  # after the resume too: the base's scores were kept
        assert got_bias[step] == pytest.approx(value, abs=1e-5), (step, got_bias[step], value)


KILL_IN_CHECKPOINT = """
import os, signal, sys
import keeltune.training.checkpoint as checkpoint
original = checkpoint.rng_state
def dying_rng_state():
    tmp = [p for p in checkpoint.checkpoint_root(checkpoint_run).glob(".tmp-step_*")]
    if any(p.name.endswith("0012") for p in tmp):  # model and optimizer are written, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
    return original()
checkpoint.rng_state = dying_rng_state
from pathlib import Path
checkpoint_run = Path(sys.argv[2])
from keeltune.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(
    assets: dict, tmp_path: Path, uninterrupted: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", resume_config(assets, tmp_path / "runs", "torn"))
    run_dir = tmp_path / "runs" / "torn"
    died = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHECKPOINT, str(cfg), str(run_dir)], capture_output=True, text=True
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    torn = run_dir / "checkpoints" / ".tmp-step_0000012"
    assert (torn / "model.safetensors").is_file() and not (run_dir / "checkpoints" / "step_0000012").exists()
    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step_0000008" in resumed.stderr
    assert not torn.exists()  # cleaned up by the next successful save
    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    for step in range(9, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, step
    reference, weights = final_weights(uninterrupted), final_weights(run_dir)
    for name in reference:
        assert torch.allclose(weights[name], reference[name], atol=1e-6, rtol=0), name


def test_resume_with_a_changed_config_is_refused_with_the_difference(
    assets: dict, tmp_path: Path, uninterrupted: Path
) -> None:
    run_dir, cfg = _copy_of(uninterrupted, tmp_path, assets)  # a finished run with checkpoints
    metrics = (run_dir / "metrics.jsonl").read_text()
    refused = keeltune("train", str(cfg), "--set", "training.lr=1e-2", "--set", "eval.every_steps=2")
    assert refused.returncode == 2
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # refused before anything ran
    assert "training.lr: 0.003 -> 0.01" in refused.stderr
    assert "eval.every_steps" not in refused.stderr.split("differ")[1].split("A resume")[0]  # allowed change
    assert "--set run.name=NEW_NAME" in refused.stderr
    allowed = keeltune("train", str(cfg), "--set", "eval.every_steps=2")
    assert allowed.returncode == 0, allowed.stderr


def test_bad_data_line_is_reported_with_file_and_line(assets: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    config = base_config(assets, tmp_path / "runs")
    config["data"]["train"] = [{"name": "broken", "path": str(broken)}]
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 2
    assert f"{broken}:3: malformed JSON" in done.stderr
    assert os.path.exists(tmp_path / "runs" / "test" / "config.yaml")


def _copy_of(uninterrupted: Path, tmp_path: Path, assets: dict) -> tuple[Path, Path]:
    """The finished run (checkpoints at steps 20 and 24) copied, with a config that resumes it."""
    run_dir = tmp_path / "runs" / "straight"
    shutil.copytree(uninterrupted, run_dir)
    return run_dir, write_config(tmp_path / "cfg.yaml", resume_config(assets, tmp_path / "runs", "straight"))


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8) + b"!" * (path.stat().st_size % 8))


DAMAGE = {  # what happens to files on real disks and in copied run folders
    "model cut in half": ("model.safetensors", _cut_in_half),
    "optimizer deleted": ("optimizer.pt", Path.unlink),
    "trainer state overwritten, same size": ("trainer_state.json", _same_size_garbage),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous_one(
    assets: dict, tmp_path: Path, uninterrupted: Path, kind: str
) -> None:
    run_dir, cfg = _copy_of(uninterrupted, tmp_path, assets)
    name, damage = DAMAGE[kind]
    damage(run_dir / "checkpoints" / "step_0000024" / name)
    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"checkpoint step_0000024 is damaged: {name}" in log, log[-3000:]
    assert "moved aside to step_0000024.damaged" in log
    assert "resuming from the newest intact checkpoint, step_0000020" in log
    note = json.loads((run_dir / "checkpoints" / "step_0000024.damaged" / "DAMAGED.json").read_text())
    assert note["problems"][0].startswith(name)
    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(21, STEPS + 1):  # steps 21-24 trained again from step 20, exactly
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [
        "step_0000020",
        "step_0000024",
        "step_0000024.damaged",
    ]  # damaged never counts to keep_last
    status = keeltune("status", str(run_dir))
    assert (
        status.returncode == 0
        and "damaged      step_0000024, moved aside to step_0000024.damaged" in status.stdout
    )


def test_only_damaged_checkpoints_are_refused_with_what_to_do_and_nothing_is_lost(
    assets: dict, tmp_path: Path, uninterrupted: Path
) -> None:
    run_dir, cfg = _copy_of(uninterrupted, tmp_path, assets)
    for step in (20, 24):  # found only by checksum: the job finds them, moves them aside, refuses
        _same_size_garbage(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")
    metrics = (run_dir / "metrics.jsonl").read_text()
    refused = keeltune("train", str(cfg))
    assert refused.returncode == 2
    assert "no intact checkpoint to resume from; damaged and moved aside" in refused.stderr
    assert "remove" in refused.stderr and "--set run.name=NEW_NAME" in refused.stderr
    again = keeltune("train", str(cfg))  # refused on the login node now, before any job starts
    assert again.returncode == 2 and "no intact checkpoint" in again.stderr
    assert "run folder" not in again.stderr  # nothing started
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # never started over: nothing wiped
    exported = keeltune("export", str(run_dir), "--out", str(tmp_path / "out"))
    assert exported.returncode == 2 and "no complete checkpoint" in exported.stderr


def test_a_checkpoint_from_before_manifests_resumes_with_a_warning(
    assets: dict, tmp_path: Path, uninterrupted: Path
) -> None:
    run_dir, cfg = _copy_of(uninterrupted, tmp_path, assets)
    (run_dir / "checkpoints" / "step_0000024" / "manifest.json").unlink()
    resumed = keeltune("train", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert (
        "step_0000024 has no manifest.json (written by an older keeltune): resuming without verifying" in log
    )
    assert "resumed from" in log and "(step 24," in log


def test_a_training_step_whose_batch_has_no_target_token_is_refused(assets: dict, tmp_path: Path) -> None:
    long_turn = " ".join(f"w{i}" for i in range(600))  # an unanswered last turn: prompt-only samples
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": long_turn}]}  # fmt: skip
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(record) + "\n")
    config = base_config(assets, tmp_path / "runs")
    config["data"]["train"] = [{"name": "chat", "path": str(chat), "format": "chat"}]
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no sample of the global batch has a target token" in done.stderr
    assert "have no target token (prompt only" in done.stderr  # prepare warned first


FULL_DISK_REPORT = """
import json, sys
from pathlib import Path
from keeltune.training.manifest import verify
checkpoints = Path(sys.argv[1]) / "checkpoints"
print(json.dumps({"exit": int(sys.argv[2]), "folders": sorted(p.name for p in checkpoints.iterdir()),
                  "intact": verify(checkpoints / "step_0000002", checksums=True) == []}))
"""


def test_a_disk_that_fills_up_while_checkpointing_keeps_the_last_checkpoint_and_says_so(
    assets: dict, tmp_path: Path
) -> None:
    """A 2 MiB tmpfs in a private user+mount namespace: the first checkpoint fits, the second cannot."""
    disk = tmp_path / "disk"
    disk.mkdir()
    config = base_config(
        assets,
        disk / "runs",
        training={"max_steps": 8, "warmup_steps": 1, "checkpoint": {"every_steps": 2, "keep_last": 1}},
        eval={"every_steps": 100, "micro_batch_size": 8, "at_start": False},
    )
    cfg = write_config(tmp_path / "cfg.yaml", config)
    script = (
        'mount -t tmpfs -o size=2m tmpfs "$1" && { "$2" -m keeltune.cli train "$3" 2>"$4"; '
        '"$2" -c "$5" "$1/runs/test" "$?"; }'
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(disk),
         sys.executable, str(cfg), str(tmp_path / "stderr.txt"), FULL_DISK_REPORT],
        capture_output=True, text=True, check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    stderr = (tmp_path / "stderr.txt").read_text()
    assert report["exit"] == 2, stderr[-3000:]
    assert "step_0000004: could not be written" in stderr and "The disk is full" in stderr
    assert "Traceback" not in stderr
    assert (
        report["folders"] == ["step_0000002"] and report["intact"]
    )  # no half checkpoint, the last one whole
