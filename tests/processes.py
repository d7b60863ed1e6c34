"""Kill a training run and every process it started, as a crash of the machine would.

``os.killpg`` on the CLI is not enough for runs of several ranks: torch's launcher starts each rank in a
session of its own (``start_new_session=True``), so the ranks outlive a killed launcher; they then stop
cleanly, with a checkpoint (``keeltune.distributed.stop_with_launcher``), which is not what a crash does. Here
the whole process tree is frozen first, so nothing moves on between the kills, then every process in it is
killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                children.setdefault(stat[1], []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_tree(process: subprocess.Popen, timeout: float = 30) -> list[int]:
    """SIGKILL ``process`` and all its descendants (frozen with SIGSTOP first); return the pids killed. Waits
    until each is dead (a zombie counts: PID 1 here does not reap orphans)."""
    stopped: list[int] = []
    pending = [process.pid]
    while pending:  # freeze top-down; a process may start a child before it is frozen: look again
        _signal_all(pending, signal.SIGSTOP)
        stopped += pending
        pending = [p for p in descendants(process.pid) if p not in stopped]
    _signal_all(stopped, signal.SIGKILL)
    process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    for pid in stopped:
        while (stat := _stat(pid)) is not None and stat[0] != "Z":
            assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
            time.sleep(0.01)
    return stopped


def live_processes(*words: str, excluding: str = "torch.distributed.run") -> list[int]:
    """Processes (not zombies) whose command line holds every one of ``words`` and not ``excluding`` (by
    default torch's launcher, whose command line names the module it starts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] == "Z" or excluding in command:
            continue
        if all(word in command for word in words):
            found.append(int(entry.name))
    return found


def start_training(config: Path, nproc: int) -> subprocess.Popen:
    """``keeltune train CONFIG --nproc N`` in the background, in a session of its own (to be killed as a group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "keeltune.cli", "train", str(config), "--nproc", str(nproc)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
