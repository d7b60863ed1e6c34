"""The review's files, vote log and page server (no model, no browser: tests/e2e/test_review_page.py has those)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keeltune.review.server import ReviewServer
from keeltune.review.store import (
    VOTES_FILE,
    ReviewError,
    VoteLog,
    load_review,
    read_votes,
    review_folder,
    review_token,
    write_review,
)
from keeltune.training.review_answers import pair_items


def _review(run_dir: Path, count: int = 3) -> Any:
    items = [
        {"id": f"{i:016x}", "prompt": f"prompt {i}", "answers": {"A": f"left {i}", "B": f"right {i}"}}
        for i in range(count)
    ]
    key = {"models": [{"label": "zebra-run"}, {"label": "okapi-base"}], "seed": 0}
    key["sides"] = {item["id"]: {"A": i % 2, "B": 1 - i % 2} for i, item in enumerate(items)}
    return write_review(review_folder(run_dir, "r1"), items, key)


def _vote(item: str, reviewer: str = "ann", choice: str = "A", **extra: Any) -> dict[str, Any]:
    return {"vote_id": f"{reviewer}-{item}", "reviewer": reviewer, "item": item, "choice": choice,
            "criteria": {}, "comment": "", **extra}  # fmt: skip


def test_pairs_cover_every_prompt_and_pair_with_seeded_order_and_sides() -> None:
    texts = [f"p{k}" for k in range(20)]
    answers = [[f"m{m}-p{k}" for k in range(20)] for m in range(3)]
    items, sides, prompt_index = pair_items(texts, answers, seed=7)
    assert len(items) == 20 * 3 and len({item["id"] for item in items}) == 60
    pairs = [tuple(sorted(sides[item["id"]].values())) for item in items]
    assert sorted(set(pairs)) == [(0, 1), (0, 2), (1, 2)] and all(pairs.count(p) == 20 for p in set(pairs))
    for item in items:  # each side shows its model's answer to the item's prompt
        k = prompt_index[item["id"]]
        assert item["prompt"] == texts[k]
        assert item["answers"] == {s: answers[m][k] for s, m in sides[item["id"]].items()}
    assert {sides[item["id"]]["A"] for item in items} == {0, 1, 2}  # sides drawn, not fixed
    assert [item["prompt"] for item in items] != sorted(item["prompt"] for item in items)
    again, again_sides, _ = pair_items(texts, answers, seed=7)  # the same order and sides, other ids
    other, _, _ = pair_items(texts, answers, seed=8)
    assert [(i["prompt"], i["answers"]) for i in again] == [(i["prompt"], i["answers"]) for i in items]
    assert not {i["id"] for i in again} & {i["id"] for i in items}  # ids say nothing of the seed
    assert [again_sides[i["id"]] for i in again] == [sides[i["id"]] for i in items]
    assert [i["prompt"] for i in other] != [i["prompt"] for i in items]


def test_review_names_and_existing_reviews_are_refused(tmp_path: Path) -> None:
    for name in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ReviewError, match="--name"):
            review_folder(tmp_path, name)
    _review(tmp_path)
    with pytest.raises(ReviewError, match="exists: choose another --name"):
        _review(tmp_path)
    with pytest.raises(ReviewError, match=r"no review named 'other'.*reviews there: \['r1'\]"):
        load_review(tmp_path, "other")


def test_votes_are_durable_counted_once_and_a_torn_line_is_cut(tmp_path: Path) -> None:
    review = _review(tmp_path)
    log = VoteLog(review.folder)
    assert log.append(_vote(review.items[0]["id"])) is True
    assert log.append(_vote(review.items[0]["id"], choice="B")) is False  # a double submit counts once
    assert log.append(_vote(review.items[0]["id"], reviewer="bob")) is True
    log.close()
    with open(review.folder / VOTES_FILE, "ab") as handle:  # a server killed in the middle of a write
        handle.write(b'{"vote_id": "x", "reviewer": "ann", "item": "00')
    assert [(v["reviewer"], v["choice"]) for v in read_votes(review.folder)] == [("ann", "A"), ("bob", "A")]
    log = VoteLog(review.folder)
    assert (review.folder / VOTES_FILE).read_bytes().endswith(b"}\n")
    assert log.voted("ann") == {review.items[0]["id"]} and len(log.votes) == 2
    log.close()


def test_one_server_per_review_and_a_dead_server_frees_it(tmp_path: Path) -> None:
    review = _review(tmp_path)
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom keeltune.review.store import VoteLog\n"
        f"log = VoteLog(Path({str(review.folder)!r}))\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ReviewError, match=f"already being served \\(pid {holder.pid} on "):
            VoteLog(review.folder)
        holder.send_signal(signal.SIGKILL)  # the kernel drops a dead process's lock
        holder.wait(timeout=10)
        log = VoteLog(review.folder)
        with pytest.raises(ReviewError, match="already being served"):  # this process's own server too
            VoteLog(review.folder)
        log.close()
    finally:
        holder.kill()
        holder.wait()


def test_the_token_is_kept_owner_only_across_restarts(tmp_path: Path) -> None:
    review = _review(tmp_path)
    token = review_token(review.folder)
    assert len(token) >= 32 and review_token(review.folder) == token
    assert stat.S_IMODE(os.stat(review.folder / "token").st_mode) == 0o600


def _request(
    server: ReviewServer, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    headers = {"X-Review-Token": token} if token else {}
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    connection.request(method, path, body=data, headers=headers)  # the path is sent as given, not normalised
    response = connection.getresponse()
    found = (response.status, dict(response.getheaders()), response.read())
    connection.close()
    return found


def test_the_server_needs_the_token_serves_no_files_and_says_nothing_of_the_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    review = _review(tmp_path)
    (review.folder / "secret.txt").write_text("SECRET")
    server = ReviewServer(review, token="t" * 32).start()
    caplog.set_level(logging.DEBUG, logger="keeltune")
    try:
        for token in (None, "wrong"):
            assert _request(server, "GET", "/api/state?reviewer=ann", token=token)[0] == 403
            assert _request(server, "GET", "/", token=token)[0] == 403
            assert _request(server, "POST", "/api/vote", _vote(review.items[0]["id"]), token=token)[0] == 403
        for path in ("/../key.json", "/%2e%2e/key.json", "/key.json", "/secret.txt", "/review/r1/key.json",
                     "/token", "/..%2f..%2fetc%2fpasswd", "//etc/passwd", "/api/../key.json"):  # fmt: skip
            status, _, body = _request(server, "GET", path + "?token=" + "t" * 32)
            assert status == 404 and b"SECRET" not in body and b"zebra" not in body, path
        status, headers, page = _request(server, "GET", "/?token=" + "t" * 32)
        assert status == 200 and "script-src 'nonce-" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        status, _, body = _request(server, "GET", "/api/state?reviewer=ann", token="t" * 32)
        state = json.loads(body)
        assert status == 200 and set(state) == {"total", "done", "item"} and state["done"] == 0
        assert (
            set(state["item"]) == {"id", "prompt", "a", "b"} and state["item"]["id"] == review.items[0]["id"]
        )
        for received in (page, body):
            assert not any(word in received for word in (b"zebra", b"okapi", b'"sides"', b"key.json"))
        bad_votes = [
            _vote("no-such-item"),
            _vote(review.items[0]["id"], choice="C"),
            _vote(review.items[0]["id"], criteria={"funny": "A"}),
            _vote(review.items[0]["id"], comment="x" * 5000),
            _vote(review.items[0]["id"], reviewer=""),
            _vote([review.items[0]["id"]]),  # unhashable values are refused, not a crash
            _vote(review.items[0]["id"], choice=["A"]),
            _vote(review.items[0]["id"], criteria=[]),
            _vote(review.items[0]["id"], comment=0),
            b"not json",
        ]
        for vote in bad_votes:
            assert _request(server, "POST", "/api/vote", vote, token="t" * 32)[0] == 400
        assert _request(server, "POST", "/api/vote", b"x" * 70000, token="t" * 32)[0] == 413
        for method in ("DELETE", "PUT", "HEAD", "OPTIONS"):
            assert _request(server, method, "/api/vote", token="t" * 32)[0] == 405
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.putrequest("POST", "/api/vote")  # a length that is no number: 411, not a dropped request
        connection.putheader("X-Review-Token", "t" * 32)
        connection.putheader("Content-Length", "ten")
        connection.endheaders()
        assert connection.getresponse().status == 411
        connection.close()
        status, _, body = _request(server, "POST", "/api/vote", _vote(review.items[0]["id"]), token="t" * 32)
        answer = json.loads(body)
        assert status == 200 and answer["saved"] and not answer["duplicate"]
        assert answer["state"]["done"] == 1 and answer["state"]["item"]["id"] == review.items[1]["id"]
        assert read_votes(review.folder)[0]["item"] == review.items[0]["id"]
    finally:
        server.close()
    assert caplog.records and not any("t" * 32 in record.getMessage() for record in caplog.records)


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    review = _review(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ReviewError, match=f"port {taken.getsockname()[1]} on 127.0.0.1 is in use"):
            ReviewServer(review, port=taken.getsockname()[1])
    ReviewServer(review).close()  # the failed start left the review free
