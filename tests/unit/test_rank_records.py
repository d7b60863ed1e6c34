"""Rank records: the heartbeat a rank keeps, and how status reads the records of a job's ranks (cause first)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from keeltune.launcher.rank_records import Heartbeat, explain, read_records, record_path


def _record(
    rank: int, outcome: str, *, beat: float, ended: float = 0.0, detail: str = "", step: int = 7
) -> dict:
    return {"rank": rank, "node": f"n{rank + 1}", "job": "42", "started": 1000.0, "outcome": outcome,
            "beat": beat, "ended": ended, "detail": detail, "step": step, "interval": 1.0}  # fmt: skip


def _explain(*records: dict) -> list[tuple[str, str]]:
    return explain({r["rank"]: r for r in records}, job="42", world_size=len(records), since=1000.0)


def test_a_heartbeat_keeps_beating_and_ends_with_the_outcome(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    step = {"now": 3}
    beat = Heartbeat(tmp_path, rank=1, world_size=2, node="n2", interval=0.05).start()
    beat.watch(lambda: step["now"])
    first = json.loads(record_path(tmp_path, 1).read_text())["beat"]
    step["now"] = 5
    time.sleep(0.3)
    running = read_records(tmp_path)[1]
    assert running["outcome"] == "running" and running["beat"] > first and running["step"] == 5
    with beat._lock:  # as if the process had been stopped for 10 s: the next beat notes the gap
        beat.record["beat"] -= 10
    time.sleep(0.15)
    frozen = read_records(tmp_path)[1]["frozen"]
    assert 9.5 < frozen[1] - frozen[0] < 11
    beat.end("stopped", "received SIGTERM")
    time.sleep(0.15)  # the thread never overwrites the ending
    ended = read_records(tmp_path)[1]
    assert (ended["outcome"], ended["detail"], ended["step"]) == ("stopped", "received SIGTERM", 5)


def test_a_silent_rank_is_the_cause_and_a_timed_out_rank_followed() -> None:
    timed_out = _record(
        0, "failed", beat=1019.5, ended=1020.0, detail="RuntimeError: [gloo] Timed out waiting 10000ms"
    )
    for silent in (
        _record(1, "running", beat=1009.5, step=6),  # still stopped when the others failed
        {  # woken up (Slurm sends SIGCONT before killing a job): its heartbeat gap tells, and it failed too
            **_record(
                1, "failed", beat=1020.5, ended=1021.0, step=6, detail="RuntimeError: Connection closed"
            ),
            "frozen": [1009.5, 1020.5],
        },
    ):
        lines = _explain(timed_out, silent)
        assert [label for label, _ in lines] == ["cause", "followed"], lines
        assert lines[0][1].startswith("rank 1 on n2 fell silent (its last heartbeat")
        assert lines[0][1].endswith("10 s before the first failure)")
        assert lines[1][1].startswith("rank 0 on n1 failed at step 7") and "Timed out" in lines[1][1]


def test_a_rank_that_vanished_comes_before_the_connection_errors_it_caused() -> None:
    lines = _explain(
        _record(0, "failed", beat=1019.9, ended=1020.0, detail="RuntimeError: Connection closed by peer"),
        _record(1, "running", beat=1019.8),
    )
    assert lines[0] == (
        "cause",
        "rank 1 on n2 ended without a word (killed from outside: kill -9, the OOM killer, srun)",
    )
    assert lines[1][0] == "followed"


def test_a_rank_failing_on_its_own_is_the_cause() -> None:
    lines = _explain(
        _record(0, "failed", beat=1020.0, ended=1021.0, detail="RuntimeError: Connection reset by peer"),
        _record(1, "failed", beat=1020.0, ended=1020.5, detail="ValueError: bad value in layer 3\nmore"),
    )
    assert lines[0] == ("cause", lines[0][1]) and "rank 1 on n2 failed at step 7" in lines[0][1]
    assert lines[0][1].endswith("ValueError: bad value in layer 3")


def test_a_clean_stop_of_every_rank_is_one_line_and_stale_records_are_ignored() -> None:
    stopped = [
        _record(r, "stopped", beat=1020.0, ended=1020.0, detail="received SIGTERM", step=44) for r in (0, 1)
    ]
    assert _explain(*stopped) == [
        (
            "stopped",
            "cleanly at step 44 after checkpointing, every rank (received SIGTERM); resume with keeltune "
            "launch (same config)",
        )  # fmt: skip
    ]
    finished = [{**r, "outcome": "finished", "detail": ""} for r in stopped]
    assert _explain(*finished) == [("finished", "every rank, at step 44")]
    older = {r["rank"]: {**r, "outcome": "failed", "started": 10.0} for r in stopped}
    assert explain(older, job="42", world_size=2, since=1000.0) == []  # an earlier attempt says nothing now
    assert explain({r["rank"]: r for r in stopped}, job="43", world_size=2, since=1000.0) == []
