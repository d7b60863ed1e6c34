"""A review's files in ``<run>/review/<name>/``: the items (written once by ``keeltune review create``), their
hidden key (which model wrote which side) and the votes, appended by one server.

Votes are one JSON line each, written, flushed and fsynced before the server answers: run folders sit on
network filesystems, where SQLite's WAL mode does not work. A POSIX lock (``fcntl.lockf``, which NFS forwards to
its lock manager, and which the kernel drops when the holder dies) on ``server.lock`` keeps a second server of
the same review from starting; a server killed mid-write leaves at most a last line without its newline, never
acknowledged, which the next server cuts off."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeltune.atomic import fsync_folder, write_atomically, write_json_atomically
from keeltune.run_folder import REVIEW_DIR

ITEMS_FILE = "items.jsonl"  # what the page shows: id, prompt, answers A and B
KEY_FILE = "key.json"  # never served: the models, and which model wrote side A and B of each item
VOTES_FILE = "votes.jsonl"
LOCK_FILE = "server.lock"
TOKEN_FILE = "token"  # owner-only: the page's access token, the same across server restarts
RESULTS_DIR = "results"
CHOICES = ("A", "B", "tie", "both_bad")
CRITERIA = ("helpful", "correct", "safe")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_COMMENT = 4000
MAX_REVIEWER = 80


class ReviewError(ValueError):
    """A review that cannot be made, found or served, with what to do."""


def review_folder(run_dir: Path, name: str) -> Path:
    """``<run>/review/<name>``; the name is refused unless it is a plain folder name."""
    if not _NAME.fullmatch(name):
        raise ReviewError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (up to 64, not starting with '.' or '-')"
        )
    return run_dir / REVIEW_DIR / name


@dataclass(frozen=True)
class Review:
    """A review as stored: the items in review order and the hidden key."""

    folder: Path
    items: list[dict[str, Any]]  # {"id", "prompt", "answers": {"A", "B"}}
    key: dict[str, Any]  # {"models": [...], "seed", "sides": {item id: {"A": model, "B": model}}, ...}

    @property
    def models(self) -> list[str]:
        return [model["label"] for model in self.key["models"]]

    def keyed_items(self) -> list[dict[str, Any]]:
        """Items with the model index of each side (for results only, never for the page)."""
        return [{**item, "models": self.key["sides"][item["id"]]} for item in self.items]


def new_review_folder(run_dir: Path, name: str) -> Path:
    """The folder of a review not made yet; an existing one is never overwritten (its votes would lose their
    items)."""
    folder = review_folder(run_dir, name)
    if (folder / ITEMS_FILE).exists():
        raise ReviewError(f"{folder} exists: choose another --name, or delete that folder to start over")
    return folder


def write_review(folder: Path, items: list[dict[str, Any]], key: dict[str, Any]) -> Review:
    """Store a new review in ``folder`` (from ``new_review_folder``)."""
    new_review_folder(folder.parent.parent, folder.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomically(folder / KEY_FILE, key)
        write_atomically(folder / ITEMS_FILE, "".join(json.dumps(item) + "\n" for item in items))
    except OSError as err:
        raise ReviewError(f"{folder}: cannot write the review ({err.strerror or err})") from None
    return Review(folder, items, key)


def load_review(run_dir: Path, name: str) -> Review:
    folder = review_folder(run_dir, name)
    if not (folder / ITEMS_FILE).is_file() or not (folder / KEY_FILE).is_file():
        found = sorted(p.parent.name for p in (run_dir / REVIEW_DIR).glob(f"*/{ITEMS_FILE}"))
        raise ReviewError(
            f"{folder}: no review named {name!r} in {run_dir} (reviews there: {found or 'none'}; "
            "make one with `keeltune review create`)"
        )
    items = [json.loads(line) for line in (folder / ITEMS_FILE).read_text().splitlines() if line]
    return Review(folder, items, json.loads((folder / KEY_FILE).read_text()))


def review_token(folder: Path) -> str:
    """The review's access token, made on first serve and kept (owner-only) so that a restarted server takes
    the same URL: reviewers' open pages go on working."""
    path = folder / TOKEN_FILE
    if not path.is_file():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(24))
            handle.flush()
            os.fsync(handle.fileno())
    return path.read_text().strip()


def read_votes(folder: Path) -> list[dict[str, Any]]:
    """The saved votes, first vote of a reviewer on an item only; a torn last line (never acknowledged) is
    skipped."""
    path = folder / VOTES_FILE
    if not path.is_file():
        return []
    votes, seen = [], set()
    for line in path.read_bytes().split(b"\n"):
        try:
            vote = json.loads(line)
        except ValueError:
            continue
        if (vote["reviewer"], vote["item"]) not in seen:
            seen.add((vote["reviewer"], vote["item"]))
            votes.append(vote)
    return votes


def check_vote(vote: Any, item_ids: set[str]) -> dict[str, Any]:
    """A vote as the page sent it, validated and reduced to its known fields; ReviewError says what is wrong."""
    if not isinstance(vote, dict):
        raise ReviewError("a vote is a JSON object")
    reviewer = vote.get("reviewer")
    if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > MAX_REVIEWER:
        raise ReviewError(f"reviewer: a name of 1 to {MAX_REVIEWER} characters")
    if not isinstance(vote.get("item"), str) or vote["item"] not in item_ids:
        raise ReviewError("item: not an item of this review")
    if not isinstance(vote.get("choice"), str) or vote["choice"] not in CHOICES:
        raise ReviewError(f"choice: one of {list(CHOICES)}")
    criteria = vote.get("criteria", {})
    if not isinstance(criteria, dict) or any(
        k not in CRITERIA or not isinstance(v, str) or v not in CHOICES for k, v in criteria.items()
    ):
        raise ReviewError(f"criteria: {{criterion: choice}} with criteria {list(CRITERIA)}")
    comment = vote.get("comment", "")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise ReviewError(f"comment: text of at most {MAX_COMMENT} characters")
    vote_id = vote.get("vote_id")
    if not isinstance(vote_id, str) or not 1 <= len(vote_id) <= 64:
        raise ReviewError("vote_id: a string of 1 to 64 characters")
    return {
        "vote_id": vote_id,
        "reviewer": reviewer.strip(),
        "item": vote["item"],
        "choice": vote["choice"],
        "criteria": criteria,
        "comment": comment,
    }


class VoteLog:
    """The one writer of a review's votes (holds ``server.lock`` while open)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock_file = _take_server_lock(folder)
        self._mutex = threading.Lock()
        _cut_torn_line(folder / VOTES_FILE)
        self.votes = read_votes(folder)
        self._keys = {(v["reviewer"], v["item"]) for v in self.votes}
        existed = (folder / VOTES_FILE).exists()
        self._file = open(folder / VOTES_FILE, "ab")  # noqa: SIM115 - open while the server runs
        if not existed:
            fsync_folder(folder)

    def voted(self, reviewer: str) -> set[str]:
        with self._mutex:
            return {v["item"] for v in self.votes if v["reviewer"] == reviewer}

    def append(self, vote: dict[str, Any]) -> bool:
        """Save ``vote`` durably; False when this reviewer already voted on the item (counted once)."""
        with self._mutex:
            if (vote["reviewer"], vote["item"]) in self._keys:
                return False
            record = {**vote, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self._file.write(json.dumps(record).encode() + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._keys.add((vote["reviewer"], vote["item"]))
            self.votes.append(record)
            return True

    def close(self) -> None:
        self._file.close()
        _SERVED.discard(self.folder.resolve())
        self._lock_file.close()  # drops the lock


_SERVED: set[Path] = set()  # POSIX locks are per process: this process's own servers are kept apart here


def _take_server_lock(folder: Path) -> Any:
    path = folder / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held open for the server's lifetime
    try:
        if folder.resolve() in _SERVED:
            raise OSError(errno.EAGAIN, "served by this process")
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ReviewError(
            f"{folder}: this review is already being served ({holder}); one server per review keeps its votes "
            "in one file. Reviewers can share that server's URL."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _SERVED.add(folder.resolve())
    return handle


def _cut_torn_line(path: Path) -> None:
    """A last line without its newline was being written when a server died: it was never acknowledged."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())
