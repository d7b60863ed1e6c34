"""Render a standalone sbatch script for a run folder (login node, no torch).

``srun`` starts one task per GPU, and each task is a rank running the same per-rank entry as every other
launch path; the entry reads its rank, local rank and world size from Slurm's variables (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``), so no torch launcher sits between Slurm and the ranks. That is the
reason for this choice: Slurm's warning before the time limit (``--signal=USR2@...``) reaches every rank
directly, all ranks checkpoint at the same step, and rank 0 requeues the job (``--requeue``), which resumes
from that checkpoint. The ranks meet at the first node (its address from Slurm when its name does not
resolve), on a port derived from the job id: the same code as ``keeltune launch``'s jobs. Every
value taken from the config is shell-quoted, both on shell lines and on ``#SBATCH`` lines (sbatch unquotes
those the way a shell does).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from keeltune.config import Config
from keeltune.run_folder import SLURM_LOG, logs_dir


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
        _directive("--ntasks-per-node", slurm.ranks_per_node),
        *([_directive("--gpus-per-node", slurm.gpus_per_node)] if slurm.gpus_per_node else []),
        _directive("--time", slurm.time),
        _directive("--output", logs_dir(run_dir) / SLURM_LOG.format(job_id="%j")),
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
        "# every task is one rank; it reads its rank and the first node's address from Slurm itself",
        " \\\n  ".join(
            map(
                shlex.quote,
                ["srun", "--kill-on-bad-exit=1", python, "-m", "keeltune.launcher.entry", str(run_dir)],
            )
        ),
        "",
    ]
    return "\n".join(lines)
