"""The rendered sbatch script, pinned by a golden file (regenerate: KEELTUNE_UPDATE_GOLDEN=1 pytest this file)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from keeltune.config import config_from_dict
from keeltune.launcher.sbatch import render_sbatch

GOLDEN = Path(__file__).parent / "golden" / "cluster-2x8.sbatch"


def _config():
    return config_from_dict(
        {
            "run": {"name": "sft", "root": "/shared/runs"},
            "model": {"path": "/shared/models/base"},
            "data": {
                "train": [{"name": "task", "path": "/shared/data/train.jsonl", "format": "instruction"}]
            },
            "slurm": {
                "nodes": 2,
                "gpus_per_node": 8,
                "partition": "gpu",
                "time": "24:00:00",
                "account": "proj-42",
                "mem": "400G",
                "directives": ["--constraint=a100", "--exclusive"],
                "setup": ["module load cuda/12.4", "source /shared/envs/keeltune/bin/activate"],
                "env": ["NCCL_DEBUG=WARN", "HF_HOME=/shared/hf cache"],
            },
        }
    )


def test_rendered_script_matches_the_golden_file() -> None:
    script = render_sbatch(_config(), Path("/shared/runs/sft"), python="/shared/envs/keeltune/bin/python")
    if os.environ.get("KEELTUNE_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()


def test_hostile_values_stay_single_shell_words() -> None:
    config = _config()
    config.slurm.job_name = "x $(touch CANARY); 'y\""
    config.slurm.env = ["NOTE=$(rm -rf ~) `id`"]
    script = render_sbatch(config, Path("/tmp/run $(touch CANARY)"), python="/usr/bin/python3")
    job_line = next(line for line in script.splitlines() if line.startswith("#SBATCH --job-name="))
    assert shlex.split(job_line.removeprefix("#SBATCH ")) == ["--job-name=x $(touch CANARY); 'y\""]
    assert "export NOTE='$(rm -rf ~) `id`'" in script
    launch = script[script.index("srun") :].replace("\\\n", " ")
    assert shlex.split(launch)[-1] == "/tmp/run $(touch CANARY)"


def test_cpu_ranks_ask_for_tasks_and_no_gpus() -> None:
    config = _config()
    config.slurm.gpus_per_node, config.slurm.ntasks_per_node = 0, 4
    script = render_sbatch(config, Path("/shared/runs/sft"), python="/usr/bin/python3")
    assert "#SBATCH --ntasks-per-node=4" in script and "--gpus-per-node" not in script
