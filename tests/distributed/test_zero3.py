"""DeepSpeed ZeRO-3 for real over gloo processes: same numbers as plain data parallel, each rank holding half,
exact resume after SIGKILL, two "nodes", streamed export that transformers loads, a Qwen2 model too."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import base_config, keeltune, read_metrics, train_losses, with_base_samples, write_config
from tests.processes import kill_tree, start_training

STEPS = 6


def zero3_config(assets: dict, root: Path, name: str, backend: str = "zero3") -> dict:
    """Training mixes in text drawn from the base model (self-replay)."""
    config = base_config(
        assets,
        root,
        run={"name": name, "root": str(root)},
        training={
            "max_steps": STEPS,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 1,
            "checkpoint": {"every_steps": 3, "keep_last": 2},
        },
        eval={"every_steps": 3, "micro_batch_size": 4},
        sharding={"backend": backend},
    )
    return with_base_samples(config, "base", samples=6, max_new_tokens=20)


def _train(cfg: Path, nproc: int) -> None:
    done = keeltune("train", str(cfg), "--nproc", str(nproc))
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(assets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-rank ZeRO-3 run and a 1-rank plain data-parallel run of the same config."""
    root = tmp_path_factory.mktemp("zero3")
    _train(write_config(root / "z3.yaml", zero3_config(assets, root / "runs", "z3")), 2)
    # the same base-model samples (one rank would draw others): a run reuses a samples file it finds
    shutil.copytree(root / "runs" / "z3" / "base_samples", root / "runs" / "ddp" / "base_samples")
    _train(write_config(root / "ddp.yaml", zero3_config(assets, root / "runs", "ddp", backend="ddp")), 1)
    return {"root": root, "ddp": root / "runs" / "ddp", "z3": root / "runs" / "z3"}


def test_two_rank_zero3_equals_one_rank_data_parallel(runs: dict[str, Path]) -> None:
    ddp, z3 = read_metrics(runs["ddp"]), read_metrics(runs["z3"])
    assert [sorted(r) for r in ddp] == [sorted(r) for r in z3]
    for expected, got in zip(ddp, z3, strict=True):
        for key, value in expected.items():
            if "loss" in key:  # seen: train losses equal to the bit, evaluations within 9e-8
                assert abs(got[key] - value) <= 1e-6, (expected["step"], key, got[key], value)
    losses = train_losses(runs["z3"])
    assert losses[STEPS] < losses[1]  # it learns
    reference, weights = (
        load_file(runs["ddp"] / "final" / "model.safetensors"),
        load_file(runs["z3"] / "final" / "model.safetensors"),
    )
    assert reference.keys() == weights.keys()
    # 1e-4, not 1e-6: ZeRO-3 reduce-scatters each gradient over 2 ranks where one rank sums it whole, so the
    # gradients differ in their last float32 bits, and Adam (which scales each element's step by that element's
    # own gradient history) turns such differences in near-zero gradients into larger weight differences that
    # add up over the steps. Seen after 6 steps: 1.2e-5 (layers.0.mlp.up_proj), most tensors below 1e-6. A
    # wrong reduction or a lost step is off by the learning rate, 3e-3.
    for name in reference:
        assert torch.allclose(weights[name], reference[name], atol=1e-4, rtol=0), name
    rank1 = (runs["z3"] / "logs" / "rank1.log").read_text()
    assert "[rank1/" in rank1


def test_base_samples_under_zero3_are_what_the_base_model_draws(runs: dict[str, Path], assets: dict) -> None:
    """Each rank draws its share with its own seed; transformers' model seeded the same draws the same text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keeltune.sharding.model import sample_sequences
    from keeltune.training.base_samples import decode_samples, sample_seed

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()

    def drawn(world_size: int) -> list[str]:
        texts = []
        for rank in range(world_size):
            torch.manual_seed(sample_seed(0, rank))
            ids = sample_sequences(
                model.generate,
                torch.full((6 // world_size, 1), tokenizer.bos_token_id),
                max_new_tokens=20,
                temperature=1.0,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts += decode_samples(tokenizer, ids)
        return texts

    lines = (runs["z3"] / "base_samples" / "base.jsonl").read_text().splitlines()
    got = [json.loads(line)["text"] for line in lines]
    assert len(got) >= 5 and got == drawn(2)  # partitioned ranks generating in lockstep
    assert got != drawn(1)  # each rank has its own seed


def _val_loss_with_transformers(run_dir: Path, model_dir: Path) -> float:
    """The run's validation loss recomputed by plain transformers on an exported folder."""
    from transformers import AutoModelForCausalLM

    from keeltune.data_pipeline.reader import PackedDataset
    from keeltune.distributed import ParallelEnv
    from keeltune.eval.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    val = next((run_dir / "data").glob("val-*"))
    result = evaluate(
        lambda ids: model(input_ids=ids, use_cache=False).logits,
        PackedDataset(val),
        ParallelEnv(),
        micro_batch_size=4,
    )
    return result.loss


def test_export_streams_a_folder_transformers_loads_with_the_engines_outputs(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "export"
    done = keeltune("export", str(runs["z3"]), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step {STEPS}" in done.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    exported, final = (
        load_file(out / "model.safetensors"),
        load_file(runs["z3"] / "final" / "model.safetensors"),
    )
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)  # checkpoint and end-of-run export agree
    engine_loss = [r["val/loss"] for r in read_metrics(runs["z3"]) if "val/loss" in r][-1]
    assert abs(_val_loss_with_transformers(runs["z3"], out) - engine_loss) <= 1e-6  # seen: equal to the bit
    earlier = keeltune("export", str(runs["z3"]), "--checkpoint", "3", "--out", str(tmp_path / "step3"))
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    step3 = load_file(tmp_path / "step3" / "model.safetensors")
    assert any(not torch.equal(step3[k], final[k]) for k in final)  # --checkpoint picks the earlier weights
    missing = keeltune("export", str(runs["z3"]), "--checkpoint", "5", "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "complete checkpoints: [3, 6]" in missing.stderr


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before the checkpoint appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_sigkill_after_a_checkpoint_resumes_exactly_and_other_rank_counts_are_refused(
    assets: dict, runs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", zero3_config(assets, tmp_path / "runs", "killed"))
    run_dir = tmp_path / "runs" / "killed"
    process = start_training(cfg, 2)
    _wait_for(run_dir / "checkpoints" / "step_0000003" / "trainer_state.json", process)
    kill_tree(process)  # the ranks too: they run in sessions of their own
    assert not (run_dir / "checkpoints" / "step_0000006").exists() and not (run_dir / "final").exists()
    refused = keeltune("train", str(cfg), "--nproc", "1")
    assert refused.returncode == 2
    assert "written by 2 rank(s)" in refused.stderr and "resume with 2 rank(s)" in refused.stderr
    assert "fsdp2 resume on any number of ranks" in refused.stderr  # refused before any rank starts
    logged = (run_dir / "logs" / "rank0.log").read_text()
    _train(cfg, 2)
    resumed = (run_dir / "logs" / "rank0.log").read_text()[len(logged) :]
    assert re.search(r"resumed from \S+step_0000003 \(step 3, ", resumed), resumed[-2000:]
    expected, got = train_losses(runs["z3"]), train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    reference, weights = (
        load_file(runs["z3"] / "final" / "model.safetensors"),
        load_file(run_dir / "final" / "model.safetensors"),
    )
    for name in reference:
        assert torch.allclose(weights[name], reference[name], atol=1e-6, rtol=0), name


def test_a_rank_partition_cut_short_is_found_by_its_rank_and_the_run_falls_back(
    assets: dict, runs: dict[str, Path], tmp_path: Path
) -> None:
    """Rank 1's own files of the newest checkpoint damaged: the ranks verify their shares in parallel, rank 0
    moves the checkpoint aside, and both resume from the previous one exactly."""
    run_dir = tmp_path / "runs" / "z3"
    shutil.copytree(runs["z3"], run_dir)
    partition = run_dir / "checkpoints" / "step_0000006" / "zero_fp32_rank0001.safetensors"
    partition.write_bytes(partition.read_bytes()[:-100])
    cfg = write_config(tmp_path / "cfg.yaml", zero3_config(assets, tmp_path / "runs", "z3"))
    _train(cfg, 2)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "checkpoint step_0000006 is damaged: zero_fp32_rank0001.safetensors:" in log, log[-3000:]
    assert "resuming from the newest intact checkpoint, step_0000003" in log
    expected, got = train_losses(runs["z3"]), train_losses(run_dir)
    for step in range(4, STEPS + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    assert (run_dir / "checkpoints" / "step_0000006.damaged" / "DAMAGED.json").is_file()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_of_one_rank_each_equal_two_local_ranks(
    assets: dict, runs: dict[str, Path], tmp_path: Path
) -> None:
    from keeltune.config import load_config
    from keeltune.launcher.run_dir import prepare_run_dir

    cfg = write_config(tmp_path / "cfg.yaml", zero3_config(assets, tmp_path / "runs", "nodes"))
    run_dir, _ = prepare_run_dir(load_config(cfg))
    endpoint = f"127.0.0.1:{_free_port()}"
    logs = [open(tmp_path / f"node{rank}.err", "w") for rank in (0, 1)]  # noqa: SIM115 (closed below)
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}",
                "--rdzv-id=keeltune",
                "-m",
                "keeltune.launcher.entry",
                str(run_dir),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=logs[rank],
        )
        for rank in (0, 1)
    ]
    for rank, node in enumerate(nodes):
        node.wait(timeout=300)
        logs[rank].close()
        assert node.returncode == 0, (tmp_path / f"node{rank}.err").read_text()[-3000:]
    expected, got = train_losses(runs["z3"]), train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


def test_each_rank_holds_half_and_loading_never_materialises_the_model(tmp_path: Path, assets: dict) -> None:
    """A ~220 MB model over 2 ranks: each rank's parameter partition is half, and loading it costs each rank
    well under the model's size in resident memory (the full model on every rank would be >= 1.0x)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "big")
    cfg = zero3_config(assets, tmp_path / "runs", "big")
    cfg["model"] = {"path": str(tmp_path / "big"), "tokenizer": str(assets["model"])}
    probe = Path(__file__).with_name("zero3_probe.py")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(probe),
            str(write_config(tmp_path / "big.yaml", cfg)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the two ranks print at the same time: their lines may run together
    reports = [json.loads(found) for found in re.findall(r"ZERO3_PROBE (\{[^{}]*\})", done.stdout)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert 200e6 < report["model_bytes"] < 240e6
        assert report["held"] / report["total"] <= 0.5 + 0.05
        assert report["load_rss_growth"] < 0.75 * report["model_bytes"], report
    assert sum(r["held"] for r in reports) >= reports[0]["total"]  # together they hold all of it


def test_a_qwen2_model_trains_and_exports_under_zero3(assets: dict, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    cfg = zero3_config(assets, tmp_path / "runs", "qwen2")
    cfg["model"] = {"path": str(tmp_path / "qwen2")}
    cfg["training"].update(max_steps=3, checkpoint={"every_steps": 3, "keep_last": 1})
    from keeltune.config import load_config
    from keeltune.launcher.run_dir import prepare_run_dir

    run_dir, _ = prepare_run_dir(load_config(write_config(tmp_path / "qwen2.yaml", cfg)))
    done = subprocess.run(  # one rank under torch's launcher: it must join the launcher's store, not its own
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=1",
            "-m",
            "keeltune.launcher.entry",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "final" / "config.json").read_text())["model_type"] == "qwen2"
    engine_loss = [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r][-1]
    assert abs(_val_loss_with_transformers(run_dir, run_dir / "final") - engine_loss) <= 1e-6  # seen: 0


def test_deepspeed_ops_built_at_setup_load_without_compiling_whatever_ninja_comes_first(
    tmp_path: Path,
) -> None:
    """Set-up ran the system's ninja and the ranks the environment's (another ninja log format): every first
    run compiled again. Now the environment's ninja always builds, and a later build would be reported."""
    code = (
        "from keeltune.sharding.zero3.ops import build_ops, ops_folder\n"
        "log = ops_folder() / 'deepspeed_shm_comm' / '.ninja_log'\n"
        "assert log.is_file(), 'scripts/setup.sh builds the ops: run it first'\n"
        "before = log.read_bytes()\n"
        "build_ops(['ShareMemCommBuilder'])\n"
        "print('UNCHANGED' if log.read_bytes() == before else 'COMPILED')\n"
    )
    env = {**os.environ, "PATH": f"/usr/bin:/bin:{Path(sys.executable).parent}", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "UNCHANGED" in done.stdout and "was compiled now" not in done.stderr


def test_a_domain_vocabulary_trains_partitioned_and_exports_with_its_tokenizer(
    assets: dict, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = base_config(
        assets,
        tmp_path / "runs",
        training={
            "max_steps": 3,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "lr": 3e-3,
            "warmup_steps": 1,
        },
        sharding={"backend": "zero3"},
        eval={"every_steps": 3, "micro_batch_size": 4, "max_samples": 16},
    )
    config["model"]["extend_vocabulary"] = {"new_tokens": 20, "min_count": 5, "sources": ["general"]}
    config["data"]["train"].append({"name": "general", "path": str(assets["general"]), "weight": 0.5})
    config["data"]["train"][0]["weight"] = 0.5
    done = keeltune("train", str(write_config(tmp_path / "cfg.yaml", config)), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "test"
    report = json.loads((run_dir / "base_model" / "keeltune_vocabulary.json").read_text())
    new = [t["id"] for t in report["tokens"]]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final", local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", local_files_only=True)
    assert len(tokenizer) == report["base_vocab_size"] + 20 == model.get_input_embeddings().weight.shape[0]
    base = load_file(run_dir / "base_model" / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(
        model.get_input_embeddings().weight.detach()[new], base[new]
    )  # the new rows trained
