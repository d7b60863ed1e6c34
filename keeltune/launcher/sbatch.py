"""Render a standalone sbatch script for a run folder (login node, no torch).

``srun`` starts one task per GPU, and each task is a rank running the same per-rank entry as every other
launch path; the entry reads its rank, local rank and world size from Slurm's variables (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``), so no torch launcher sits between Slurm and the ranks. That is the
reason for this choice: Slurm's warning before the time limit (``--signal=USR2@...``) reaches every rank
directly, all ranks checkpoint at the same step, and rank 0 requeues the job (``--requeue``), which resumes
from that checkpoint. The master address is the first node, the port is derived from the job id. Every
value taken from the config is shell-quoted, both on shell lines and on ``#SBATCH`` lines (sbatch unquotes
those the way a shell does).
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
        _directive("--ntasks-per-node", slurm.gpus_per_node),
        _directive("--gpus-per-node", slurm.gpus_per_node),
        _directive("--time", slurm.time),
        _directive("--output", run_dir / "logs" / "slurm-%j.out"),
        _directive("--signal", f"USR2@{slurm.signal_delay_s}"),
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
    lines += [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # a port per job, the same on every node",
        "export MASTER_ADDR MASTER_PORT KEELTUNE_RANKS_FROM_SLURM=1",
        " \\\n  ".join(
            map(
                shlex.quote,
                ["srun", "--kill-on-bad-exit=1", python, "-m", "keeltune.launcher.entry", str(run_dir)],
            )
        ),
        "",
    ]
    return "\n".join(lines)
