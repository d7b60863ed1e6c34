"""The human review page in a real browser (Debian's chromium through Playwright), on a review created from the
session's tiny run against a copy of its base model: two reviewers vote on every item by clicking and by keyboard
in two browser contexts at once, a reload resumes at the right item, a server killed and restarted on its port
loses no vote, a double submit counts once, model text is shown as text (never markup), nothing the browser
received names a model, requests without the token are refused, and ``keeltune review results`` counts exactly
the votes cast. Screenshots go to the test's folder (``KEELTUNE_UPDATE_SCREENSHOT=1`` also writes the README's
``docs/review.png``)."""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Browser, BrowserContext, Dialog, Page, Route, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.conftest import SharedRun, keeltune, write_jsonl

# Debian's chromium (scripts/install-browser.sh): Playwright's own browser download is not reachable
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
WAIT_MS = 5000  # a failing wait fails in seconds, not Playwright's 30
REPO = Path(__file__).resolve().parents[2]
NAME = "r1"
RUN_NAME = "ft-zebra"  # distinctive names of the two models: searched for in all the browser received
OTHER_NAME = "okapi-base-model"
XSS_PROMPT = (
    "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2;alert('xss')\">"
    '</div><b id="injected">x</b> Say hi'
)
XSS_ANSWER = '<img src=x onerror="window.__xss=3;alert(\'answer\')"><b id="injected">y</b>&amp; done'
PROMPTS = [
    {"instruction": "Name three causes of catastrophic forgetting in fine-tuning.", "input": ""},
    {"instruction": "Summarise in one sentence why checkpoints matter on preemptible nodes.", "input": ""},
    {"instruction": XSS_PROMPT, "input": ""},
    {"instruction": "Write a haiku about gradient descent.", "input": ""},
    {"instruction": "Translate to French: the model is ready.", "input": ""},
]
TYPED = "B is right, A is off topic"
COMMENT = TYPED + "a"  # then "a", a key that votes outside the comment box
# the tiny model's answers are gibberish: this item's are readable ones, for the README's screenshot
SHOWN = {
    "Summarise in one sentence why checkpoints matter on preemptible nodes.": {
        "A": "Preemptible nodes are cheaper machines that the provider can take back at any time.",
        "B": "A checkpoint lets a job that loses its node resume from the last saved step instead of "
        "starting over, so preemption costs minutes rather than the whole run.",
    },
}
Vote = tuple[str, int, str, dict[str, str]]  # a vote cast: reviewer, item index, choice, criteria
PAGE_FIELDS = {"id", "prompt", "a", "b", "total", "done", "item", "saved", "duplicate", "state"}


# ------------------------------------------------------------------------------------------------ the server


@dataclass
class Server:
    """A ``keeltune review serve`` process and the URL it printed."""

    process: subprocess.Popen[str]
    url: str
    printed: str

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0

    @property
    def token(self) -> str:
        return parse_qs(urlsplit(self.url).query)["token"][0]


def start_server(run_dir: Path, port: int, started: list[subprocess.Popen[str]]) -> Server:
    """Start ``keeltune review serve`` (``port`` 0: a free one) and wait for its ``open:`` line."""
    command = [sys.executable, "-m", "keeltune.cli", "review", "serve", str(run_dir), "--name", NAME]
    process = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started.append(process)
    lines: queue.Queue[str | None] = queue.Queue()  # read on: a full pipe would stop the server

    def read() -> None:
        for line in process.stdout or []:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    printed = ""
    while "\nopen: " not in "\n" + printed:
        line = lines.get(timeout=60)
        assert line is not None, f"the server ended (exit {process.wait()}): {printed[-3000:]}"
        printed += line
    url = next(line for line in printed.splitlines() if line.startswith("open: "))
    return Server(process, url.removeprefix("open: ").strip(), printed)


def kill(server: Server) -> None:
    """SIGKILL: the hardest way a server ends (no cleanup at all)."""
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)


def raw_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """(status, body) of a request sent with ``path`` exactly as written (not normalised)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**(headers or {}), "Content-Length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------------ the browser


@dataclass
class Received:
    """One response the browser received."""

    url: str
    status: int
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        return " ".join([self.url, json.dumps(self.headers), self.body.decode(errors="replace")])


@dataclass
class Seen:
    """What the pages received, and what must stay empty: dialogs opened and uncaught script errors."""

    received: list[Received]
    dialogs: list[str]
    errors: list[str]


def watch(context: BrowserContext, seen: Seen) -> None:
    """Pass every request of ``context`` through, recording each response in full (a request to a dead server
    fails as it would without the recording: connection refused)."""

    def capture(route: Route) -> None:
        try:
            response = route.fetch(timeout=WAIT_MS)
        except PlaywrightError:
            route.abort("connectionrefused")
            return
        seen.received.append(Received(route.request.url, response.status, response.headers, response.body()))
        route.fulfill(response=response)

    context.route("**/*", capture)


def open_page(browser: Browser, url: str, seen: Seen) -> Page:
    context = browser.new_context(viewport={"width": 1100, "height": 640})
    context.set_default_timeout(WAIT_MS)
    watch(context, seen)
    page = context.new_page()

    def dialog_opened(dialog: Dialog) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dialog_opened)
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    page.goto(url)
    return page


def log_in(page: Page, reviewer: str) -> None:
    expect(page.locator("#login")).to_be_visible()
    page.fill("#name", reviewer)
    page.click("#login button[type=submit]")
    expect(page.locator("#reviewer-name")).to_have_text(f"Reviewer: {reviewer}")


def expect_item(page: Page, item: dict[str, Any], done: int, total: int) -> None:
    """``item`` is on screen, as text exactly (no markup made of it), and ``done`` of ``total`` are voted."""
    expect(page.locator("#progress-text")).to_have_text(f"{done} / {total} done")
    expect(page.locator("#review")).to_be_visible()
    for selector, text in (("#prompt", item["prompt"]), ("#answer-a", item["answers"]["A"])):
        assert page.text_content(selector) == text
        assert page.inner_text(selector) == text.strip()  # what a reader sees: the raw string, not markup
    assert page.text_content("#answer-b") == item["answers"]["B"]
    injected = page.evaluate(
        "() => [typeof window.__xss, document.querySelectorAll('#injected, main img, main script').length]"
    )
    assert injected == ["undefined", 0]


def vote_by_key(page: Page, key: str, item: dict[str, Any], done: int, total: int) -> None:
    """Press ``key`` and wait for ``item`` (the next one) with ``done`` votes."""
    page.keyboard.press(key)
    expect_item(page, item, done, total)


def vote_by_click(page: Page, choice: str) -> None:
    page.click(f"[data-choice={choice}]")


def post_twice(page: Page, token: str, vote: dict[str, Any]) -> list[dict[str, Any]]:
    """The same vote posted twice at once from the page (a double submit), both answers."""
    return page.evaluate(
        """async ([token, vote]) => Promise.all([1, 2].map(() => fetch("api/vote", {
             method: "POST", headers: {"X-Review-Token": token, "Content-Type": "application/json"},
             body: JSON.stringify(vote)}).then((r) => r.json())))""",
        [token, vote],
    )


def screenshot(page: Page, path: Path, readme: bool = False) -> None:
    page.screenshot(path=path)
    if readme and os.environ.get("KEELTUNE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, REPO / "docs" / "review.png")


# ------------------------------------------------------------------------------------------------ the review


def seed_with_wins_and_losses() -> int:
    """A seed whose sides make the test's A/B votes (items 0 and 1 and 3: A, B, B) a win for the run on some
    item and a loss on another, so the results cover every outcome (the default seed is random)."""
    from keeltune.training.review_answers import pair_items

    for seed in range(100):
        items, sides, _ = pair_items([""] * len(PROMPTS), [[""] * len(PROMPTS)] * 2, seed)
        run_side = ["A" if sides[item["id"]]["A"] == 0 else "B" for item in items]
        outcomes = {run_side[0] == "A", run_side[1] == "B", run_side[3] == "B"}
        if outcomes == {True, False}:
            return seed
    raise AssertionError("no seed below 100 mixes wins and losses")


def make_review(ddp_run: SharedRun, assets: dict[str, Path], tmp_path: Path) -> Path:
    """A 5-item review ``r1`` of the tiny run, renamed ``ft-zebra``, against a copy of its base model called
    ``okapi-base-model``; some answers rewritten (markup, and readable ones for the screenshot)."""
    copied = ddp_run.copy(tmp_path).run_dir
    run_dir = copied.rename(copied.parent / RUN_NAME)
    other = shutil.copytree(assets["model"], tmp_path / OTHER_NAME)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    done = keeltune(
        "review", "create", str(run_dir), "--against", str(other), "--prompts", str(prompts),
        "--format", "instruction", "--n", "5", "--max-new-tokens", "12", "--name", NAME,
        "--seed", str(seed_with_wins_and_losses()),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"models: {RUN_NAME}, {OTHER_NAME}" in done.stdout
    items_file = run_dir / "review" / NAME / "items.jsonl"
    items = [json.loads(line) for line in items_file.read_text().splitlines()]
    assert sorted(item["prompt"] for item in items) == sorted(p["instruction"] for p in PROMPTS)
    # before the review is served: the tiny model's answers are gibberish; the XSS item's answer A becomes
    # markup (checked to show as text), and one item gets readable answers for the README's screenshot
    next(item for item in items if item["prompt"] == XSS_PROMPT)["answers"]["A"] = XSS_ANSWER
    for item in items:
        item["answers"] = SHOWN.get(item["prompt"], item["answers"])
    write_jsonl(items_file, items)
    return run_dir


def outcome(choice: str, run_side: str) -> str:
    """A vote's outcome for the run (model 0), named as in the results."""
    if choice in ("A", "B"):
        return "wins" if choice == run_side else "losses"
    return {"tie": "ties", "both_bad": "both_bad"}[choice]


def expected_counts(
    votes: list[Vote], items: list[dict[str, Any]], sides: dict[str, Any]
) -> dict[str, Counter[str]]:
    """Wins, losses, ties and both_bad of the run, overall (""), per reviewer and per criterion, from the votes
    cast and the key's sides."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for reviewer, index, choice, criteria in votes:
        item_sides = sides[items[index]["id"]]
        assert sorted(item_sides.values()) == [0, 1]
        run_side = "A" if item_sides["A"] == 0 else "B"
        counts[""][outcome(choice, run_side)] += 1
        counts[f"reviewer {reviewer}"][outcome(choice, run_side)] += 1
        for criterion, criterion_choice in criteria.items():
            counts[f"criterion {criterion}"][outcome(criterion_choice, run_side)] += 1
    return counts


def counted(rate: dict[str, Any]) -> Counter[str]:
    return Counter({key: rate[key] for key in ("wins", "losses", "ties", "both_bad") if rate[key]})


def test_review_page_in_a_real_browser(ddp_run: SharedRun, assets: dict[str, Path], tmp_path: Path) -> None:
    run_dir = make_review(ddp_run, assets, tmp_path)
    folder = run_dir / "review" / NAME
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    key = json.loads((folder / "key.json").read_text())
    total = len(items)
    assert total == 5 and [m["label"] for m in key["models"]] == [RUN_NAME, OTHER_NAME]
    cast: list[Vote] = []
    seen = Seen([], [], [])
    started: list[subprocess.Popen[str]] = []
    try:
        server = start_server(run_dir, 0, started)
        assert "0 votes so far" in server.printed
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            alice = open_page(browser, server.url, seen)
            screenshot(alice, tmp_path / "01-name.png")
            log_in(alice, "alice")
            expect_item(alice, items[0], 0, total)

            # alice, item 0 by a click
            vote_by_click(alice, "A")
            cast.append(("alice", 0, "A", {}))
            expect_item(alice, items[1], 1, total)

            # bob, in his own browser context at the same time: item 0 by key
            bob = open_page(browser, server.url, seen)
            log_in(bob, "bob")
            expect_item(bob, items[0], 0, total)
            vote_by_key(bob, "1", items[1], 1, total)
            cast.append(("bob", 0, "A", {}))

            # alice, item 1: by criterion with a comment (keys typed in the comment are text, not votes), a click;
            # a reload resumes at item 2
            alice.click("#details summary")
            alice.check("input[name=criterion-helpful][value=B]")
            alice.check("input[name=criterion-correct][value=tie]")
            alice.fill("#comment", TYPED)
            alice.press("#comment", "a")
            expect(alice.locator("#comment")).to_have_value(COMMENT)
            expect(alice.locator("#progress-text")).to_have_text(f"1 / {total} done")
            screenshot(alice, tmp_path / "02-item.png", readme=True)
            vote_by_click(alice, "B")
            cast.append(("alice", 1, "B", {"helpful": "B", "correct": "tie"}))
            expect_item(alice, items[2], 2, total)
            alice.reload()
            expect(alice.locator("#login")).to_be_hidden()
            expect_item(alice, items[2], 2, total)

            # bob clicks twice in one go: the page sends one vote
            bob.evaluate(
                "() => { const b = document.querySelector('[data-choice=tie]'); b.click(); b.click(); }"
            )
            cast.append(("bob", 1, "tie", {}))
            expect_item(bob, items[2], 2, total)

            vote_by_key(alice, "t", items[3], 3, total)
            cast.append(("alice", 2, "tie", {}))

            # the server dies (every vote so far on disk): a click is not saved, the page says so and keeps the
            # item; restarted on the same port (and token), the server has every vote, and the vote is saved
            kill(server)
            assert len((folder / "votes.jsonl").read_text().splitlines()) == len(cast)
            vote_by_click(alice, "B")
            expect(alice.locator("#error")).to_be_visible()
            expect(alice.locator("#error")).to_contain_text("NOT saved")
            expect_item(alice, items[3], 3, total)
            screenshot(alice, tmp_path / "03-not-saved.png")
            restarted = start_server(run_dir, server.port, started)
            assert restarted.url == server.url
            assert f"{len(cast)} votes so far" in restarted.printed
            vote_by_key(alice, "2", items[4], 4, total)
            cast.append(("alice", 3, "B", {}))
            expect(alice.locator("#error")).to_be_hidden()

            # a double submit of bob's vote on item 2, both requests at once: saved once
            vote = {"reviewer": "bob", "item": items[2]["id"], "choice": "both_bad", "vote_id": "bob-2"}
            answers = post_twice(bob, restarted.token, vote)
            assert sorted(answer["duplicate"] for answer in answers) == [False, True]
            assert all(answer["saved"] for answer in answers)
            cast.append(("bob", 2, "both_bad", {}))
            # bob's page still shows item 2: voting on it again says it was already saved, and moves on
            vote_by_click(bob, "A")
            expect(bob.locator("#notice")).to_contain_text("already saved")
            expect_item(bob, items[3], 3, total)

            alice.keyboard.press("x")
            cast.append(("alice", 4, "both_bad", {}))
            expect(alice.locator("#progress-text")).to_have_text(f"{total} / {total} done")
            expect(alice.locator("#done")).to_be_visible()
            expect(alice.locator("#review")).to_be_hidden()
            screenshot(alice, tmp_path / "04-done.png")

            # another reviewer on bob's browser: "change reviewer" asks for a name; alice's state follows her
            bob.click("#switch")
            expect(bob.locator("#review")).to_be_hidden()
            log_in(bob, "alice")
            expect(bob.locator("#done")).to_be_visible()
            browser.close()

        assert seen.dialogs == [] and seen.errors == []
        check_nothing_names_a_model(seen.received, tmp_path, key)
        check_the_token_is_needed(restarted.port, restarted.token, folder)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    check_votes(folder, items, cast)
    check_results(run_dir, items, key, cast)


# ------------------------------------------------------------------------------------------------ the checks


def check_nothing_names_a_model(received: list[Received], tmp_path: Path, key: dict[str, Any]) -> None:
    """No URL, header or body the browser received names a model, a path or the key; the JSON holds only the
    page's fields."""
    assert {urlsplit(r.url).path for r in received} >= {"/", "/api/state", "/api/vote"}
    page = next(r for r in received if urlsplit(r.url).path == "/")
    assert "script-src 'nonce-" in page.headers["content-security-policy"]
    secrets = [RUN_NAME, "zebra", "okapi", str(tmp_path), "key.json", '"sides"', "prompt_index", "tokenizer"]
    secrets += [str(value) for model in key["models"] for value in model.values()]
    for response in received:
        text = response.text()
        assert not [secret for secret in secrets if secret in text], (response.url, text[:2000])
        assert response.status == 200, (response.url, response.status)
        if urlsplit(response.url).path != "/":
            assert _keys(json.loads(response.body)) <= PAGE_FIELDS, response.body[:2000]


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    return set()


def check_the_token_is_needed(port: int, token: str, folder: Path) -> None:
    """Requests without the token, or with another, are refused; no path reaches a file of the review."""
    votes_before = (folder / "votes.jsonl").read_bytes()
    vote = json.dumps({"reviewer": "eve", "item": "x", "choice": "A", "vote_id": "e"}).encode()
    for method, path, body, headers in [
        ("GET", "/", b"", {}),
        ("GET", "/?token=wrong", b"", {}),
        ("GET", "/api/state?reviewer=x", b"", {}),
        ("GET", "/api/state?reviewer=x", b"", {"X-Review-Token": "wrong"}),
        ("GET", f"/api/state?reviewer=x&token={token}x", b"", {}),
        ("POST", "/api/vote", vote, {"Content-Type": "application/json"}),
        ("POST", "/api/vote?token=wrong", vote, {"X-Review-Token": "wrong"}),
    ]:
        status, text = raw_request(port, method, path, body, headers)
        assert status == 403 and token not in text, (method, path, status, text)
    assert raw_request(port, "GET", f"/api/state?reviewer=x&token={token}")[0] == 200  # the same, with it
    for path in ["/../key.json", "/%2e%2e/key.json", "/key.json", f"/review/{NAME}/key.json", "/token"]:
        for headers in ({}, {"X-Review-Token": token}):
            status, text = raw_request(port, "GET", path, headers=headers)
            assert status == 404, (path, status)
            assert not [s for s in (RUN_NAME, OTHER_NAME, '"sides"', token) if s in text], text
    assert (folder / "votes.jsonl").read_bytes() == votes_before


def check_votes(folder: Path, items: list[dict[str, Any]], cast: list[Vote]) -> None:
    """votes.jsonl holds each vote cast exactly once, as cast."""
    lines = [json.loads(line) for line in (folder / "votes.jsonl").read_text().splitlines()]
    saved = sorted(
        (v["reviewer"], v["item"], v["choice"], json.dumps(v["criteria"], sort_keys=True)) for v in lines
    )
    wanted = sorted((r, items[i]["id"], c, json.dumps(crit, sort_keys=True)) for r, i, c, crit in cast)
    assert saved == wanted
    commented = next(v for v in lines if v["criteria"])
    assert commented["comment"] == COMMENT and commented["reviewer"] == "alice"


def check_results(run_dir: Path, items: list[dict[str, Any]], key: dict[str, Any], cast: list[Vote]) -> None:
    """``keeltune review results --json`` counts what the test derives from the votes cast and the key."""
    done = keeltune("review", "results", str(run_dir), "--name", NAME, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    want = expected_counts(cast, items, key["sides"])
    assert results["models"] == [RUN_NAME, OTHER_NAME] and results["items"] == len(items)
    assert results["votes"] == len(cast) and results["reviewers"] == ["alice", "bob"]
    (overall,) = results["vs"]
    assert overall["opponent"] == OTHER_NAME and counted(overall) == want[""]
    assert all(want[""].values()) and len(want[""]) == 4  # the votes cast cover every outcome
    wins, losses, ties = (want[""][k] for k in ("wins", "losses", "ties"))
    assert overall["rate"] == (wins + 0.5 * ties) / (wins + losses + ties)
    assert overall["votes"] == len(cast) and overall["items"] == len(items)
    assert sorted(results["by_reviewer"]) == ["alice", "bob"]
    for reviewer, rates in results["by_reviewer"].items():
        assert [counted(rate) for rate in rates] == [want[f"reviewer {reviewer}"]]
    for criterion, rates in results["by_criterion"].items():
        assert [counted(rate) for rate in rates] == [want[f"criterion {criterion}"]]
    assert sorted(results["by_criterion"]) == ["correct", "helpful"]
    (agreement,) = results["agreement"]
    both = {(i, c) for r, i, c, _ in cast if r == "alice"} & {(i, c) for r, i, c, _ in cast if r == "bob"}
    assert agreement["items"] == 3 and agreement["raw"] == len(both) / 3
    for name in ("results.md", "results.png", "results.json"):
        assert (run_dir / "review" / NAME / "results" / name).is_file()
