"""The rendered sbatch script, pinned by a golden file.

The tests only compare, they never write. After a deliberate change of the rendered script, update the golden
files with ``scripts/update-goldens`` (or ``.venv/bin/python -m tests.unit.update_goldens``), review
``git diff tests/unit/golden`` and commit it with the change; ``scripts/update-goldens --check`` lists the
files that differ without writing them."""

from __future__ import annotations

import shlex
from pathlib import Path

from keeltune.launcher.sbatch import render_sbatch
from tests.unit.update_goldens import (
    GOLDEN_DIR,
    GOLDENS,
    UPDATE_COMMAND,
    cluster_2x8_config,
    render_cluster_2x8,
)

_config = cluster_2x8_config


def test_rendered_script_matches_the_golden_file() -> None:
    golden = GOLDEN_DIR / "cluster-2x8.sbatch"
    assert render_cluster_2x8() == golden.read_text(), f"if the change is deliberate: {UPDATE_COMMAND}"


def test_every_golden_file_has_its_renderer() -> None:
    """So that the update command rewrites every golden file, and none is left unchecked."""
    on_disk = sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_file())
    assert on_disk == sorted(GOLDENS) == ["cluster-2x8.sbatch"]


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
