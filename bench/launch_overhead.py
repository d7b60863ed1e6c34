"""Launch overhead: from ``keeltune launch`` to the first training step on the local Slurm cluster, against a
bare ``sbatch --wrap`` of the same training (the per-rank entry on an already written run folder), in this
command, interleaved. Prints the median difference in seconds (goal: < 5 s).

Needs the local test cluster (``bash slurm/local-cluster/install.sh && bash slurm/local-cluster/start.sh``).

    python bench/launch_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def build_assets(workdir: Path) -> dict:
    """A tiny Llama with a BPE tokenizer and a small instruction set; a config that trains it on 1 rank."""
    from pydoc_data.topics import topics

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from keeltune.demo.tokenizer import train_tokenizer

    texts = [topics[name] for name in sorted(topics)]
    tokenizer = train_tokenizer(texts, 512, workdir / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(workdir / "model")
    records = [{"text": t} for t in texts[:30]]
    (workdir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {
        "model": {"path": str(workdir / "model")},
        "data": {"seq_len": 64, "train": [{"name": "general", "path": str(workdir / "train.jsonl")}]},
        "training": {"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 8, "warmup_steps": 0},
        "eval": {"at_start": False},
        "logging": {"wandb": {"mode": "disabled"}},
        "slurm": {"time": "10", "mem": "3000M", "env": ["OMP_NUM_THREADS=2"]},
    }


def first_step_time(run_dir: Path, timeout: float = 300) -> float:
    """Wall-clock time at which the run logged its first training step."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                if "train/loss" in record:
                    return record["time"]
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: no training step after {timeout} s")


def timed_launch(workdir: Path, base: dict, name: str) -> float:
    config = {**base, "run": {"name": name, "root": str(workdir / "runs")}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "keeltune.cli", "launch", str(path), "--nodes", "1", "--gpus-per-node", "1"],
        check=True,
        capture_output=True,
    )
    return first_step_time(workdir / "runs" / name) - started


def timed_sbatch_wrap(workdir: Path, base: dict, name: str) -> float:
    from keeltune.config import config_from_dict
    from keeltune.launcher.run_dir import prepare_run_dir

    config = config_from_dict({**base, "run": {"name": name, "root": str(workdir / "runs")}})
    run_dir, _ = prepare_run_dir(config)
    command = shlex.join([sys.executable, "-m", "keeltune.launcher.entry", str(run_dir)])
    started = time.time()
    subprocess.run(
        [
            "sbatch",
            "--nodes=1",
            "--ntasks=1",
            "--gpus-per-node=1",
            "--mem=3000M",
            "--time=10",
            f"--output={run_dir}/logs/wrap-%j.out",
            f"--wrap={command}",
        ],
        check=True,
        capture_output=True,
    )
    return first_step_time(run_dir) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = os.environ.get("KEELTUNE_SLURM_DIR", "/var/tmp/keeltune-slurm")
    os.environ.setdefault("SLURM_CONF", f"{state}/etc/slurm.conf")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = build_assets(workdir)
        launch, wrap = [], []
        for repeat in range(args.repeats):  # interleaved, so drift in the machine's load hits both
            launch.append(timed_launch(workdir, base, f"launch{repeat}"))
            wrap.append(timed_sbatch_wrap(workdir, base, f"wrap{repeat}"))
            print(
                f"repeat {repeat}: keeltune launch {launch[-1]:.2f} s, sbatch --wrap {wrap[-1]:.2f} s",
                flush=True,
            )
    difference = statistics.median(launch) - statistics.median(wrap)
    print(
        f"median to first step: keeltune launch {statistics.median(launch):.2f} s, "
        f"bare sbatch --wrap {statistics.median(wrap):.2f} s"
    )
    print(f"overhead = {difference:+.2f} s (goal < 5 s)")


if __name__ == "__main__":
    main()
