"""``keeltune launch`` on the login node (no torch): submit a run folder through submitit, to Slurm or to this
machine, and keep a job record in the run folder for ``status``, ``logs`` and ``cancel``.

submitit starts one task per GPU with ``srun`` (so no torch launcher inside the job, unlike the standalone
sbatch script, which has one task per node running torch's launcher); every task runs ``job.TrainJob``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keeltune.atomic import write_atomically, write_json_atomically
from keeltune.config import Config, ConfigError
from keeltune.config.schema import timeout_minutes
from keeltune.launcher.entry import STOPPED_EXIT
from keeltune.run_folder import (
    JOB_FILE,
    METRICS_FILE,
    RANK_LOG,
    SLURM_LOG,
    SUBMITIT_DIR,
    WANDB_ID_FILE,
    logs_dir,
)

ENDED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
     "DEADLINE", "STOPPED"}
)  # fmt: skip


def _directives(config: Config) -> dict[str, Any]:
    """``slurm.directives`` (``--constraint=a100``, ``--exclusive``) as submitit's additional parameters."""
    extra: dict[str, Any] = {"requeue": True}
    for directive in config.slurm.directives:
        option, has_value, value = directive.removeprefix("--").partition("=")
        extra[option.replace("-", "_")] = value if has_value else True
    return extra


def executor_for(config: Config, run_dir: Path, *, local: bool) -> Any:
    """A submitit executor with the config's resources; ``local`` runs on this machine without Slurm."""
    import shlex

    import submitit

    slurm = config.slurm
    if local and slurm.nodes != 1:
        raise ConfigError(
            f"slurm.nodes: --local runs on this one machine; got {slurm.nodes} nodes (use --nodes 1)"
        )
    if not local and shutil.which("sbatch") is None:
        raise ConfigError("no Slurm on this machine (sbatch not found); use --local to run the job here")
    executor = submitit.AutoExecutor(
        folder=run_dir / SUBMITIT_DIR / "%j", cluster="local" if local else "slurm"
    )
    executor.update_parameters(
        name=slurm.job_name or config.run.name,
        timeout_min=timeout_minutes(slurm.time),
        nodes=slurm.nodes,
        tasks_per_node=slurm.ranks_per_node,
    )
    if not local:
        setup = [*slurm.setup]
        setup += [
            f"export {key}={shlex.quote(value)}" for key, _, value in (p.partition("=") for p in slurm.env)
        ]
        executor.update_parameters(
            slurm_gpus_per_node=slurm.gpus_per_node or None,
            slurm_partition=slurm.partition or None,
            slurm_account=slurm.account or None,
            slurm_qos=slurm.qos or None,
            slurm_mem=slurm.mem or None,
            slurm_cpus_per_task=slurm.cpus_per_task or None,
            slurm_signal_delay_s=slurm.signal_delay_s,
            slurm_setup=setup,
            slurm_srun_args=["--kill-on-bad-exit=1"],  # one dead rank ends every rank, fast
            slurm_additional_parameters=_directives(config),
        )
    return executor


def dry_run_script(config: Config, run_dir: Path) -> str:
    """The sbatch script submitit would submit for this run (nothing is submitted)."""
    executor = executor_for(config, run_dir, local=False)
    return executor._executor._make_submission_file_text(executor._executor._submitit_command_str, "dry-run")


@dataclass
class JobRecord:
    """One submission of a run folder."""

    job_id: str
    cluster: str  # slurm | local
    submitted: float
    nodes: int
    tasks_per_node: int
    # where the job's output lands: submitit's folder (per-task stdout/stderr), or the run's logs/
    folder: str
    # submitit (keeltune launch) | sbatch (the rendered script, recorded by its rank 0)
    launcher: str = "submitit"

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    def outputs(self) -> list[Path]:
        """The job's stderr files, where srun reports dead tasks."""
        folder = Path(self.folder)
        if self.launcher == "sbatch":
            return sorted(folder.glob(SLURM_LOG.format(job_id=self.job_id)))
        return sorted(folder.glob("*_log.err"))


def read_records(run_dir: Path) -> list[JobRecord]:
    path = run_dir / JOB_FILE
    if not path.is_file():
        return []
    return [JobRecord(**entry) for entry in json.loads(path.read_text())]


def add_record(run_dir: Path, record: JobRecord) -> None:
    """Append a job to the run folder's records (replaced whole: written aside, fsynced, renamed)."""
    records = [*read_records(run_dir), record]
    write_json_atomically(run_dir / JOB_FILE, [asdict(r) for r in records], indent=1)


def latest_record(run_dir: Path) -> JobRecord:
    records = read_records(run_dir)
    if not records:
        raise ConfigError(f"{run_dir}: no job was launched from this run folder (no {JOB_FILE})")
    return records[-1]


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder, fixed before the job starts so the launcher can print it."""
    path = run_dir / WANDB_ID_FILE
    if not path.is_file():
        write_atomically(path, uuid.uuid4().hex[:12])  # never an empty id after a crash
    return path.read_text().strip()


def submit(config: Config, run_dir: Path, *, local: bool) -> tuple[JobRecord, Any]:
    """Submit ``run_dir`` (already holding its resolved config); returns the record and submitit's job."""
    from keeltune.launcher.job import TrainJob

    executor = executor_for(config, run_dir, local=local)
    try:
        job = executor.submit(TrainJob(run_dir))
    except Exception as err:  # submitit wraps sbatch's refusal in its own error, with sbatch's stderr
        raise submission_refused(config, str(err)) from None
    unexpanded = run_dir / SUBMITIT_DIR / "%j"  # submitit makes the folder pattern itself once; keep it tidy
    if unexpanded.is_dir() and not any(unexpanded.iterdir()):
        unexpanded.rmdir()
    record = JobRecord(
        job_id=str(job.job_id),
        cluster="local" if local else "slurm",
        submitted=round(time.time(), 3),
        nodes=config.slurm.nodes,
        tasks_per_node=config.slurm.ranks_per_node,
        folder=str(run_dir / SUBMITIT_DIR / str(job.job_id)),
    )
    add_record(run_dir, record)
    return record, job


REFUSAL_HINTS = (  # (what sbatch says, lowercase; what to change)
    ("gres", "the partition may have no GPUs: for CPU ranks set slurm.gpus_per_node: 0 (and "
             "slurm.ntasks_per_node), or choose a partition with GPUs (slurm.partition, --partition)"),
    ("node configuration is not available", "no node of that partition has what the job asks for"),
    ("partition", "check slurm.partition (sinfo lists the partitions)"),
    ("time limit", "lower slurm.time (--time) to the partition's limit (sinfo -o '%P %l')"),
    ("memory", "lower slurm.mem, or ask for fewer ranks per node"),
    ("node count", "lower slurm.nodes (--nodes), or choose a larger partition"),
    ("account", "check slurm.account (--account): sacctmgr show assoc user=$USER"),
    ("qos", "check slurm.qos (--qos)"),
)  # fmt: skip


def submission_refused(config: Config, error: str) -> ConfigError:
    """sbatch's refusal (``sbatch: error: ...``) as a config error saying which setting to change."""
    said = list(dict.fromkeys(line.strip() for line in error.splitlines() if "error:" in line))
    said = said or [error.strip()[-500:]]
    text = " ".join(said).lower()
    hints = [hint for pattern, hint in REFUSAL_HINTS if pattern in text]
    slurm = config.slurm
    if slurm.gpus_per_node and ("gres" in text or "node configuration is not available" in text):
        hints.insert(0, REFUSAL_HINTS[0][1])  # asking for GPUs where there are none is the usual cause
    asked = (
        f"{slurm.nodes} node(s) x {slurm.ranks_per_node} task(s)"
        + (f", {slurm.gpus_per_node} GPU(s) per node" if slurm.gpus_per_node else ", no GPUs")
        + f", partition {slurm.partition or '(default)'}, time {slurm.time}"
    )
    return ConfigError(
        f"slurm: sbatch refused the job ({asked}): {' '.join(said)}"
        + (f"; {'; '.join(dict.fromkeys(hints))}" if hints else "")
    )


# --------------------------------------------------------------------------- status, logs, cancel


def slurm_state(job_id: str) -> dict[str, str]:
    """State, elapsed time, nodes and reason of a Slurm job (accounting first, then the controller)."""
    done = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,Elapsed,NodeList,Reason,ExitCode"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if line:
        state, elapsed, nodes, reason, exit_code = (line.split("|") + [""] * 5)[:5]
        return {
            "state": state.split(" ")[0],
            "elapsed": elapsed,
            "nodes": nodes,
            "reason": reason,
            "exit": exit_code,
        }
    queue = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T|%M|%N|%r"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    state, elapsed, nodes, reason = (queue.stdout.strip().split("|") + [""] * 4)[:4]
    return {"state": state or "UNKNOWN", "elapsed": elapsed, "nodes": nodes, "reason": reason, "exit": ""}


def in_queue(job_id: str) -> bool:
    """Whether Slurm's controller still holds the job (pending, running, requeued)."""
    queue = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False, timeout=30
    )
    return bool(queue.stdout.strip())


def local_state(record: JobRecord) -> dict[str, str]:
    """A local job: running while its tasks' processes live, else what its result files say."""
    folder = Path(record.folder)
    results = list(folder.glob("*_result.pkl"))
    if len(results) >= record.tasks_per_node:
        state = "COMPLETED"
    elif any(folder.glob("*_log.err")) and not _local_alive(record):
        state = "FAILED" if results or _errors_in(folder) else "STOPPED"
    else:
        state = "RUNNING" if _local_alive(record) else "UNKNOWN"
    return {"state": state, "elapsed": "", "nodes": "localhost", "reason": "", "exit": ""}


def _local_alive(record: JobRecord) -> bool:
    try:
        stat = Path(f"/proc/{int(record.job_id)}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}  # zombies are not alive


def _errors_in(folder: Path) -> bool:
    return any("Traceback" in path.read_text(errors="replace") for path in folder.glob("*_log.err"))


def job_state(record: JobRecord) -> dict[str, str]:
    return slurm_state(record.job_id) if record.cluster == "slurm" else local_state(record)


def progress(run_dir: Path, max_steps: int) -> str:
    """The last logged step and train loss from metrics.jsonl."""
    path = run_dir / METRICS_FILE
    last: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if '"train/loss"' in line:
                last = json.loads(line)
    if not last:
        return f"no training step logged yet (of {max_steps})"
    return f"step {last['step']}/{max_steps}, train loss {last['train/loss']:.4f}"


def cancel(record: JobRecord) -> None:
    if record.cluster == "slurm":
        subprocess.run(["scancel", record.job_id], check=True, timeout=30)
        return
    import signal

    if _local_alive(record):
        os.killpg(os.getpgid(int(record.job_id)), signal.SIGTERM)


def rank_logs(run_dir: Path, rank: int) -> Path:
    """keeltune's own log of one rank (every line says rank and node)."""
    return logs_dir(run_dir) / RANK_LOG.format(rank=rank)


def task_output(record: JobRecord, rank: int) -> list[Path]:
    """submitit's stdout/stderr of the task that ran ``rank`` (tracebacks land there)."""
    folder = Path(record.folder)
    return sorted(p for p in folder.glob(f"*_{rank}_log.*") if re.search(r"_log\.(out|err)$", p.name))


def dead_ranks(record: JobRecord) -> list[str]:
    """Ranks that died, as srun reported them (``srun: error: n2: task 1: Killed``); one line each."""
    found = []
    for path in record.outputs():
        text = path.read_text(errors="replace")
        for node, task, what in re.findall(r"srun: error: (\S+): tasks? ([\d,-]+): (.+)", text):
            what = what.strip()
            if what == f"Exited with exit code {STOPPED_EXIT}":
                what += " (stopped cleanly after checkpointing)"
            found.append(f"rank {task} on {node}: {what}")
    return sorted(set(found))
