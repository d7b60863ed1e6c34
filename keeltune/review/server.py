"""``keeltune review serve``: the review page and its two calls, on the Python standard library.

Nothing is read from disk by request path: the page is one file of this package (its script and style
inline, no CDN), and ``api/state`` / ``api/vote`` answer from the review in memory, so no request reaches a
file. Every request needs the review's token (in the page's URL, then a header); what the page receives holds
an item's id, prompt and the two answers, never which model wrote them. Answers are shown as text (the page
sets ``textContent``) and a Content-Security-Policy lets only the page's own script run."""

from __future__ import annotations

import errno
import hmac
import json
import logging
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from keeltune.review.store import Review, ReviewError, VoteLog, check_vote

log = logging.getLogger("keeltune")
MAX_BODY = 64 * 1024


def _page(nonce: str) -> bytes:
    text = resources.files("keeltune.review").joinpath("page.html").read_text()
    return text.replace("__NONCE__", nonce).encode()


class ReviewServer:
    """A running review server; ``url`` carries the token. Stop it with ``close()``."""

    def __init__(self, review: Review, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.review = review
        self.token = token or secrets.token_urlsafe(24)
        self.votes = VoteLog(review.folder)  # refuses a second server on this review
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as err:
            self.votes.close()
            if err.errno == errno.EADDRINUSE:
                raise ReviewError(
                    f"port {port} on {host} is in use: choose another --port (--port 0 picks a free one)"
                ) from None
            raise ReviewError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.token}"

    def state(self, reviewer: str) -> dict[str, Any]:
        """The reviewer's progress and next item (in review order, the first not voted on), or None when done."""
        voted = self.votes.voted(reviewer)
        upcoming = next((item for item in self.review.items if item["id"] not in voted), None)
        shown = None
        if upcoming is not None:
            answers = upcoming["answers"]
            shown = {"id": upcoming["id"], "prompt": upcoming["prompt"], "a": answers["A"], "b": answers["B"]}
        return {"total": len(self.review.items), "done": len(voted), "item": shown}

    def start(self) -> ReviewServer:
        """Serve in a background thread (tests, and ``serve_forever`` callers that want to do other work)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="review-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.votes.close()


def _handler(server: ReviewServer) -> type[BaseHTTPRequestHandler]:
    item_ids = {item["id"] for item in server.review.items}

    class Handler(BaseHTTPRequestHandler):
        server_version = "keeltune-review"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """One line per request, without the query (it may hold the token)."""
            log.debug(
                "review %s %s %s", self.command, urlsplit(self.path).path, args[1] if len(args) > 1 else ""
            )

        def _send(self, status: int, body: bytes, content_type: str, nonce: str = "") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header(
                "Content-Security-Policy",
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            )
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _authorised(self, query: dict[str, list[str]]) -> bool:
            given = self.headers.get("X-Review-Token") or (query.get("token") or [""])[0]
            if hmac.compare_digest(given.encode(), server.token.encode()):
                return True
            refusal = "a valid token is needed: open the URL that keeltune review serve printed"
            if self.path.startswith("/api/"):
                self._json(HTTPStatus.FORBIDDEN, {"error": refusal})
            else:  # a person opened the page with a wrong URL
                self._send(HTTPStatus.FORBIDDEN, refusal.encode(), "text/plain; charset=utf-8")
            return False

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path not in ("/", "/api/state"):
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            if not self._authorised(query):
                return
            if url.path == "/":
                nonce = secrets.token_urlsafe(16)
                self._send(HTTPStatus.OK, _page(nonce), "text/html; charset=utf-8", nonce)
                return
            reviewer = (query.get("reviewer") or [""])[0].strip()
            if not reviewer:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "reviewer: give your name"})
                return
            self._json(HTTPStatus.OK, server.state(reviewer))

        def do_POST(self) -> None:  # noqa: N802 - the base class's name
            url = urlsplit(self.path)
            if url.path != "/api/vote":
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            if not self._authorised(parse_qs(url.query)):
                return
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "a vote needs its Content-Length"})
                return
            if not 0 < int(length) <= MAX_BODY:
                self._json(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"a vote is at most {MAX_BODY} bytes"}
                )
                return
            try:
                vote = check_vote(json.loads(self.rfile.read(int(length))), item_ids)
            except (ValueError, ReviewError) as err:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
            try:
                saved = server.votes.append(vote)
            except OSError as err:
                log.error("review: a vote could not be saved: %s", err)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"saved": False, "error": f"not saved: {err}"})
                return
            self._json(
                HTTPStatus.OK,
                {"saved": True, "duplicate": not saved, "state": server.state(vote["reviewer"])},
            )

        def do_PUT(self) -> None:  # noqa: N802
            self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET or POST only"})

        do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT  # noqa: N815

    return Handler


def tunnel_hint(port: int) -> str:
    """The SSH command that brings a login node's port to the reviewer's machine."""
    import getpass
    import socket

    return f"ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{socket.getfqdn()}"
