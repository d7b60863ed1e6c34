"""Each rank's own record in the run folder, ``logs/rank<R>.json`` (torch-free): a heartbeat while it runs, then
how it ended (finished, stopped cleanly after checkpointing, or failed and why).

A rank that fails reads the others' heartbeats to name one that fell silent (a stopped process, a frozen node:
its heartbeat thread stops with it); ``keeltune status`` reads them all to tell the rank that failed or fell
silent first from those that only followed, and a clean stop from a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keeltune.atomic import write_json_atomically
from keeltune.run_folder import RANK_RECORD, logs_dir

ENDINGS = ("finished", "stopped", "failed")


def heartbeat_interval(collective_timeout_s: float) -> float:
    """Seconds between heartbeats: well under the collective timeout (a silent rank must look stale when the
    others time out) and at most a minute (thousands of ranks share one filesystem)."""
    return min(60.0, max(1.0, collective_timeout_s / 10))


def record_path(run_dir: Path, rank: int) -> Path:
    return logs_dir(run_dir) / RANK_RECORD.format(rank=rank)


def read_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Every rank's record, by rank (unreadable ones skipped: they are being replaced)."""
    found = {}
    for path in logs_dir(run_dir).glob(RANK_RECORD.format(rank="*")):
        try:
            record = json.loads(path.read_text())
            found[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


class Heartbeat:
    """This rank's record, rewritten every ``interval`` seconds by a thread while the rank runs."""

    def __init__(self, run_dir: Path, *, rank: int, world_size: int, node: str, interval: float) -> None:
        self.path = record_path(run_dir, rank)
        self.run_dir, self.interval = run_dir, interval
        self.record: dict[str, Any] = {
            "rank": rank,
            "world_size": world_size,
            "node": node,
            "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID", ""),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "started": round(time.time(), 3),
            "outcome": "running",
            "step": 0,
            "interval": interval,
        }
        self._step: Callable[[], int] = lambda: 0
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="keeltune-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def watch(self, step: Callable[[], int]) -> None:
        """Where to read the current step from."""
        self._step = step

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            self._write()

    def _write(self, **update: Any) -> None:
        with self._lock:
            if self.record["outcome"] != "running" and not update:
                return  # ended: the thread never overwrites the ending
            with contextlib.suppress(Exception):  # the trainer is being built or torn down
                self.record["step"] = int(self._step())
            self.record.update(update)
            if not update:  # a beat; an ending keeps the last beat (a rank frozen until it failed shows it)
                now = round(time.time(), 3)
                if now - self.record.get("beat", now) > 3 * self.interval:  # the whole process was frozen
                    self.record["frozen"] = [self.record["beat"], now]
                self.record["beat"] = now
            # a full or flaky filesystem must not end the rank; the log still says it all. Only the ending is
            # fsynced: thousands of ranks beating on one shared filesystem need not sync every beat
            with contextlib.suppress(OSError):
                write_json_atomically(self.path, self.record, fsync=bool(update))

    def end(self, outcome: str, detail: str = "") -> None:
        """Record how this rank ended (one of ENDINGS) and stop beating."""
        self._done.set()
        self._write(outcome=outcome, detail=detail, ended=round(time.time(), 3))

    def silent_ranks(self) -> list[dict[str, Any]]:
        """The other ranks of this job whose heartbeat stopped although they have not ended (stale by more than
        three intervals), longest silent first."""
        now = time.time()
        silent = [
            record
            for rank, record in read_records(self.run_dir).items()
            if rank != self.record["rank"]
            and record.get("job") == self.record["job"]
            and record.get("started", 0) >= self.record["started"] - 600
            and record.get("outcome") == "running"
            and now - record.get("beat", now) > 3 * self.interval
        ]
        return sorted(silent, key=lambda r: r.get("beat", 0))


def silence_note(silent: list[dict[str, Any]], now: float | None = None) -> str:
    """``rank 1 on n2 fell silent (its last heartbeat 12 s ago, at step 7)`` for each silent rank."""
    now = time.time() if now is None else now
    return "; ".join(
        f"rank {r['rank']} on {r.get('node', '?')} fell silent (its last heartbeat {now - r.get('beat', now):.0f} s "
        f"ago, at step {r.get('step', '?')})"
        for r in silent
    )


def explain(
    records: dict[int, dict[str, Any]], *, job: str, world_size: int, since: float
) -> list[tuple[str, str]]:
    """How the ranks of this job's latest attempt ended, as (label, text) lines for ``keeltune status``: a
    finish or a clean stop in one line; a failure as the rank that failed (or fell silent) first, then the
    ranks that followed. Empty when the records say nothing (ranks not started, or all still running)."""
    mine = {
        rank: r for rank, r in records.items()
        if rank < world_size and r.get("started", 0) >= since - 5 and (not job or r.get("job") in ("", job))
    }  # fmt: skip
    if not mine:
        return []
    ended = {rank: r for rank, r in mine.items() if r.get("outcome") in ENDINGS}
    failed = {rank: r for rank, r in ended.items() if r["outcome"] == "failed"}
    if not failed:
        if len(ended) == world_size and all(r["outcome"] == "finished" for r in ended.values()):
            return [("finished", f"every rank, at step {max(r.get('step', 0) for r in ended.values())}")]
        if len(ended) == world_size and all(r["outcome"] == "stopped" for r in ended.values()):
            first = ended[min(ended)]
            return [("stopped", f"cleanly at step {first.get('step')} after checkpointing, every rank "
                                f"({first.get('detail') or 'a stop signal'}); resume with keeltune launch (same config)")]  # fmt: skip
        return []
    first_failure = min(r.get("ended", 0) for r in failed.values())
    interval = max(r.get("interval", 1.0) for r in mine.values())
    silent = {rank: r for rank, r in mine.items() if _silent_since(r, first_failure, interval) is not None}
    failed = {rank: r for rank, r in failed.items() if rank not in silent}
    own_errors = {rank: r for rank, r in failed.items() if not is_collective_failure(r.get("detail", ""))}
    vanished = sorted(set(range(world_size)) - set(ended) - set(silent))
    events = [  # most telling first: a rank that fell silent, one that failed by itself, one that vanished,
        # and last the collective failures that the others see as a consequence
        *[(0, _silent_since(r, first_failure, interval), rank, _silent_text(rank, r, first_failure, interval))
          for rank, r in silent.items()],
        *[(1, r.get("ended", 0), rank, _failed_text(rank, r)) for rank, r in own_errors.items()],
        *[(2, 0.0, rank, _vanished_text(rank, mine.get(rank))) for rank in vanished],
        *[(3, r.get("ended", 0), rank, _failed_text(rank, r)) for rank, r in failed.items() if rank not in own_errors],
    ]  # fmt: skip
    events.sort()
    return [("cause" if i == 0 else "followed", text) for i, (*_, text) in enumerate(events)]


COLLECTIVE_FAILURES = (
    "connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
    "nccl", "gloo", "distbackenderror", "processgroup",
)  # fmt: skip


def is_collective_failure(detail: str) -> bool:
    """An error a rank sees when another rank died or stopped answering (rather than a failure of its own)."""
    text = detail.lower()
    return any(pattern in text for pattern in COLLECTIVE_FAILURES)


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def _silent_since(record: dict[str, Any], first_failure: float, interval: float) -> float | None:
    """When a rank's heartbeat stopped, if it was frozen (stopped, its node hung) when the first rank failed:
    still without a heartbeat then, or with a gap in its heartbeats around that time (Slurm wakes a stopped
    process before killing it, and it fails in turn)."""
    frozen = record.get("frozen")
    if frozen and frozen[0] < first_failure - 3 * interval and frozen[1] >= first_failure - interval:
        return frozen[0]
    last = record.get("beat", first_failure)
    if (
        record.get("outcome") in ("running", "failed")
        and (record.get("ended") or first_failure) - last > 3 * interval
    ):
        return last
    return None


def _silent_text(rank: int, record: dict[str, Any], first_failure: float, interval: float) -> str:
    since = _silent_since(record, first_failure, interval) or first_failure
    return (
        f"rank {rank} on {record.get('node', '?')} fell silent (its last heartbeat {_clock(since)}, "
        f"{first_failure - since:.0f} s before the first failure)"
    )


def _failed_text(rank: int, record: dict[str, Any]) -> str:
    return (
        f"rank {rank} on {record.get('node', '?')} failed at step {record.get('step')} "
        f"({_clock(record.get('ended', 0))}): {_first_line(record.get('detail', ''))}"
    )


def _vanished_text(rank: int, record: dict[str, Any] | None) -> str:
    where = f"on {record.get('node', '?')} " if record else ""
    return f"rank {rank} {where}ended without a word (killed from outside: kill -9, the OOM killer, srun)"


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line if len(line) <= limit else line[: limit - 3] + "..."
