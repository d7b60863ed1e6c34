"""Render a standalone sbatch script for a run folder (login node, no torch).

One Slurm task per node starts torch's launcher, which starts one rank per GPU and sets the local ranks; the
ranks run the same per-rank entry as local training. The launchers meet through torch's c10d rendezvous on
the first node, which numbers the nodes itself (the batch shell cannot: it expands ``$SLURM_NODEID`` once). Every value taken from the config is shell-quoted, both
on shell lines and on ``#SBATCH`` lines (sbatch unquotes those the way a shell does).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from keeltune.config import Config


def _directive(option: str, value: str | int) -> str:
    return f"#SBATCH {option}={shlex.quote(str(value))}"


def render_sbatch(config: Config, run_dir: Path, *, python: str = sys.executable) -> str:
    """The sbatch script that trains ``run_dir`` (already holding its config.yaml) with ``config.slurm``."""
    slurm = config.slurm
    lines = [
        "#!/bin/bash",
        "# Rendered by `keeltune sbatch`; submit with: sbatch THIS_FILE",
        _directive("--job-name", slurm.job_name or config.run.name),
        _directive("--nodes", slurm.nodes),
        _directive("--ntasks-per-node", 1),
        _directive("--gpus-per-node", slurm.gpus_per_node),
        _directive("--time", slurm.time),
        _directive("--output", run_dir / "logs" / "slurm-%j.out"),
        "#SBATCH --requeue",
    ]
    for option, value in (
        ("--partition", slurm.partition),
        ("--account", slurm.account),
        ("--qos", slurm.qos),
        ("--mem", slurm.mem),
        ("--cpus-per-task", slurm.cpus_per_task or ""),
    ):
        if value:
            lines.append(_directive(option, value))
    for directive in slurm.directives:
        option, _, value = directive.partition("=")
        lines.append(_directive(option, value) if value else f"#SBATCH {shlex.quote(option)}")
    lines += ["", "set -euo pipefail", ""]
    if slurm.setup:
        lines += ["# setup lines from the config (slurm.setup), run as written", *slurm.setup, ""]
    for pair in slurm.env:
        key, _, value = pair.partition("=")
        lines.append(f"export {key}={shlex.quote(value)}")
    shell_words = [  # written here, expanded by the job's shell on purpose
        '--nnodes="$SLURM_NNODES"',
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
    ]
    launcher = [
        *map(shlex.quote, ["srun", "--kill-on-bad-exit=1", python, "-m", "torch.distributed.run"]),
        shell_words[0],
        f"--nproc-per-node={slurm.gpus_per_node}",
        "--rdzv-backend=c10d",
        *shell_words[1:],
        *map(shlex.quote, ["-m", "keeltune.launcher.entry", str(run_dir)]),
    ]
    lines += [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # a port per job, the same on every node",
        "export MASTER_ADDR MASTER_PORT",
        " \\\n  ".join(launcher),
        "",
    ]
    return "\n".join(lines)
