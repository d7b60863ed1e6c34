"""Ranks: who this process is among them (``ParallelEnv``, the only owner of the process group), how ranks are
started on this machine, how a rank ends, and the one mapping from Slurm's variables to torch's.

Torch, never DeepSpeed: the launcher, the loop, the backends and evaluation all read this module."""

from __future__ import annotations

import ctypes
import datetime
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist


@dataclass
class ParallelEnv:
    """Rank layout of this process; works without a process group when there is one rank."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls, timeout_s: float = 600.0, preflight_timeout_s: float = 120.0) -> ParallelEnv:
        """Read torch's launcher variables (RANK, WORLD_SIZE, LOCAL_RANK), join the process group (collectives
        fail after ``timeout_s`` instead of hanging) and check that every rank answers (``preflight``)."""
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        parallel = cls(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
        if world_size > 1:
            parallel.preflight(preflight_timeout_s)
        return parallel

    def preflight(self, timeout_s: float) -> None:
        """Every rank passes a checked barrier and a small all-reduce within ``timeout_s``; otherwise raise an
        error that names the ranks that did not answer and where they run, instead of hanging."""
        hosts = self.hosts()
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        try:
            dist.monitored_barrier(
                group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True
            )
        except RuntimeError as err:
            missing = sorted(int(r) for r in re.findall(r"\d+", str(err).split("failed to pass")[0]))
            where = ", ".join(f"rank {r} on {hosts.get(r, 'an unknown node')}" for r in missing)
            raise RuntimeError(
                f"preflight: {where or 'some rank'} did not answer within {timeout_s:.0f} s "
                f"(training.preflight_timeout_s); check that node, or its GPU, and relaunch ({err})"
            ) from None
        ones = torch.ones(1, device=self.device)
        if int(self.all_reduce_sum(ones).item()) != self.world_size:
            raise RuntimeError(f"preflight: an all-reduce over {self.world_size} ranks gave {ones.item()}")

    def hosts(self) -> dict[int, str]:
        """Which node each rank runs on, from Slurm's layout when known (no collective: it cannot hang)."""
        nodelist, per_node = os.environ.get("SLURM_JOB_NODELIST", ""), os.environ.get("LOCAL_WORLD_SIZE")
        names = _expand_nodelist(nodelist) if nodelist else []
        if names and per_node and int(per_node) * len(names) == self.world_size:
            return {rank: names[rank // int(per_node)] for rank in range(self.world_size)}
        return {self.rank: self.node}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def node(self) -> str:
        return os.environ.get("SLURMD_NODENAME") or socket.gethostname()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place (a no-op with one rank)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, value: object) -> object:
        """Rank 0's value on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: object) -> list[object]:
        """Every rank's value, in rank order, on rank 0 (an empty list elsewhere)."""
        if not self.distributed:
            return [value]
        out: list[object] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out or []

    def ensure_process_group(self) -> None:
        """A process group even for one rank (DeepSpeed needs one): the launcher's rendezvous when there is one,
        else a private one on a free local port. ``close`` destroys it like any other."""
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed reads them even for one process
        if dist.is_initialized():
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if os.environ.get("MASTER_ADDR") and os.environ.get(
            "MASTER_PORT"
        ):  # a launcher's rendezvous (torchrun's
            dist.init_process_group(
                backend
            )  # agent store, or the Slurm job's): a private port would never meet
            return
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    def close(self) -> None:
        """Destroy the process group, whoever asked for it (a run of several ranks, or a backend's one rank)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_rank(status: int) -> NoReturn:
    """End a rank's process without interpreter finalization, after flushing logs and output: gloo's worker
    threads can still hold tensors then, and freeing them during finalization aborts the process ("terminate
    called without an active exception", pytorch#179291), which the launcher reports as a failed rank; seen here
    in 1 of 10 to 4 of 8 three-rank runs."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


PR_SET_PDEATHSIG = 1  # prctl option in linux/prctl.h


def stop_with_launcher() -> None:
    """Under torch's launcher, have Linux send this rank SIGTERM when the launcher dies. The launcher starts each
    rank in a session of its own, so a launcher killed outright (SIGKILL, the OOM killer, a closed terminal)
    would leave its ranks training, orphaned, into the run folder; with a stop handler installed, SIGTERM makes
    them checkpoint at the next step boundary and end, as a cancel does."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def run_local_ranks(nproc: int, module: str, *args: str) -> int:
    """``python -m module args`` as ``nproc`` ranks on this machine through torch's launcher (a free local
    port; the cores split among the ranks unless OMP_NUM_THREADS is set); returns the exit status."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *args,
    ]
    return subprocess.run(command, env=env, check=False).returncode


def run_job_on_ranks(nproc: int, module: str, job: dict[str, Any], what: str) -> Any:
    """``module``'s main on ``nproc`` local ranks, given ``job`` (a JSON file, its ``out`` the file where rank 0
    writes its JSON result); returns that result. ``what`` names the work in the error of a failed rank."""
    with tempfile.TemporaryDirectory(prefix="keeltune-ranks-") as tmp:
        job = {**job, "out": str(Path(tmp) / "out.json")}
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        status = run_local_ranks(nproc, module, str(job_file))
        if status != 0:
            raise RuntimeError(f"{what}: the {nproc} ranks failed (exit {status})")
        return json.loads(Path(job["out"]).read_text())


def rank_of_job(argv: list[str] | None, work: Callable[[dict[str, Any], ParallelEnv], Any]) -> int:
    """One rank of ``run_job_on_ranks``: ``work(job, parallel)`` on this rank; rank 0 writes its result."""
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    parallel = ParallelEnv.from_environment()
    try:
        result = work(job, parallel)
        if parallel.is_main:
            Path(job["out"]).write_text(json.dumps(result))
    finally:
        parallel.close()
    return 0


def master_port(job_id: str) -> int:
    """A port per job, the same on every node."""
    digits = "".join(ch for ch in job_id.split("_")[0] if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def master_address(node: str) -> str:
    """Where the ranks meet: the first node's name when it resolves here, else its address as Slurm knows it
    (``NodeAddr``: clusters whose node names are not in DNS); an error naming the node when neither exists."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    address = _slurm_node_address(node)
    if address:
        return address
    raise RuntimeError(
        f"cannot find an address for the first node {node!r} of this job: its name does not resolve (DNS or "
        "/etc/hosts) and Slurm knows no NodeAddr for it (scontrol show node). Ask your cluster's admins, or "
        "give the address in slurm.env: [KEELTUNE_MASTER_ADDR=<address of the first node>]"
    )


def _slurm_node_address(node: str) -> str:
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", node, "--oneliner"], capture_output=True, text=True, timeout=30,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(r"\bNodeAddr=(\S+)", shown.stdout)
    return found.group(1) if found and shown.returncode == 0 else ""


def rendezvous_environment(
    *, rank: int, local_rank: int, world_size: int, local_world_size: int, first_node: str, job_id: str
) -> dict[str, str]:
    """torch's env:// variables for a rank of a job; ``KEELTUNE_MASTER_ADDR``, when set, names the address."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": os.environ.get("KEELTUNE_MASTER_ADDR") or master_address(first_node),
        "MASTER_PORT": str(master_port(job_id)),
    }


def slurm_task_environment() -> dict[str, str]:
    """The rendezvous variables of a task started by ``srun`` (one task per rank), from Slurm's variables."""
    nodes = _expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
    world_size = int(os.environ.get("SLURM_NTASKS", "1"))
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]
    return rendezvous_environment(
        rank=int(os.environ["SLURM_PROCID"]),
        local_rank=int(os.environ.get("SLURM_LOCALID", "0")),
        world_size=world_size,
        local_world_size=int(per_node) if per_node else max(1, world_size // len(nodes)),
        first_node=nodes[0],
        job_id=os.environ.get("SLURM_JOB_ID", "0"),
    )


def _expand_nodelist(nodelist: str) -> list[str]:
    """``n[1-3,5],gpu7`` -> ``[n1, n2, n3, n5, gpu7]`` (Slurm's compact host list)."""
    names = []
    for prefix, ranges, single in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if single:
            names.append(single)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                names.append(f"{prefix}{number:0{len(first)}d}")
    return names
