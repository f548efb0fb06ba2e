"""`quell p808 serve`: the rating page, the clips and a small JSON API, for in-house raters on a local network.

    GET  /                 the page (app.js in "server" mode)
    GET  /clips/...        the test's WAV files (byte ranges, as browsers ask for media)
    POST /api/start        {"rater"} -> the rater's open session and the items answered, or a new session
    POST /api/played       {"rater", "session", "item"}: the page heard the item's clips to their end
    POST /api/vote         {"rater", "session", "item", "votes": {scale: integer}}

A submission that is not what the API takes gets 400 (413 when too large) with {"error": ...} and nothing is
stored; one the state refuses (a vote before its clip played to the end, a second vote for an item) gets 409
with a `code` the page acts on. Python's standard library only: http.server, one thread per request, sqlite3.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from quell.dns.p808.design import ListeningTest, P808Error, VoteError, load_test
from quell.dns.p808.page import render_page
from quell.dns.p808.store import Conflict, VoteStore

MAX_BODY_BYTES = 16 * 1024  # a vote is well under 1 KiB
_BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    server: RatingServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet: the votes are the log."""

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = unquote(urlsplit(self.path).path)
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path.startswith("/clips/"):
            self._send_clip(path[1:])
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    def _send_clip(self, relative: str) -> None:
        root = self.server.clips
        file = (root.parent / relative).resolve()
        if not file.is_relative_to(root) or file.suffix != ".wav" or not file.is_file():
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such clip: {relative}"})
            return
        data = file.read_bytes()
        first, last = 0, len(data) - 1
        status, headers = HTTPStatus.OK, {"Accept-Ranges": "bytes"}
        asked = _BYTE_RANGE.fullmatch(self.headers.get("Range", ""))
        if asked and (asked[1] or asked[2]):
            if asked[1]:  # "bytes=FIRST-" or "bytes=FIRST-LAST"
                first, last = int(asked[1]), min(int(asked[2] or last), last)
            else:  # "bytes=-N": the last N bytes
                first = max(0, len(data) - int(asked[2]))
            if first > last:
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "audio/wav",
                           {"Content-Range": f"bytes */{len(data)}"})
                return
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self._send(status, data[first : last + 1], "audio/wav", headers)

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        route = {"/api/start": self._start, "/api/played": self._played, "/api/vote": self._vote}.get(path)
        if route is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such API: {path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "a JSON body with a Content-Length is required"})
            return
        if length > MAX_BODY_BYTES or length < 0:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "the body is not JSON"})
            return
        try:
            if not isinstance(body, dict):
                raise VoteError("the body must be a JSON object")
            self._json(HTTPStatus.OK, route(body))
        except VoteError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Conflict as error:
            self._json(HTTPStatus.CONFLICT, {"error": str(error), "code": error.code})
        except sqlite3.OperationalError as error:  # the database stayed locked past the busy timeout
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"database busy ({error}); try again"})

    @staticmethod
    def _fields(body: dict, *names: str) -> list:
        unknown = set(body) - set(names)
        if unknown:
            raise VoteError(f"unknown field(s): {', '.join(sorted(unknown))}")
        missing = [name for name in names if name not in body]
        if missing:
            raise VoteError(f"missing field(s): {', '.join(missing)}")
        return [body[name] for name in names]

    def _start(self, body: dict) -> dict:
        return self.server.store.start(*self._fields(body, "rater"))

    def _played(self, body: dict) -> dict:
        self.server.store.played(*self._fields(body, "rater", "session", "item"))
        return {"played": True}

    def _vote(self, body: dict) -> dict:
        return {"stored": True, "complete": self.server.store.vote(*self._fields(body, "rater", "session", "item",
                                                                                    "votes"))}


class RatingServer(ThreadingHTTPServer):
    """The web app of one test folder; its votes database is locked to it until `close()`."""

    daemon_threads = True

    def __init__(self, test: ListeningTest, store: VoteStore, address: tuple[str, int]) -> None:
        self.test = test
        self.store = store
        self.clips = (test.folder / "clips").resolve()
        self.page = render_page({"mode": "server"}).encode()
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start_background(self) -> None:
        """Serve in a daemon thread (tests, notebooks); `close()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (if in the background), close the socket, unlock the database."""
        if self._thread is not None:
            self.shutdown()  # waits for serve_forever, which only a running loop ever lets return
            self._thread.join()
            self._thread = None
        self.server_close()
        self.store.close()


def open_server(folder: str | Path, db: str | Path | None = None, host: str = "127.0.0.1",
                port: int = 8808) -> RatingServer:
    """The server of the test in `folder`, votes in `db` (default: votes.db in the folder); port 0 picks one.

    Raises P808Error, before listening, when another server has the database or another program locks it.
    """
    test = load_test(folder)
    store = VoteStore(db or test.folder / "votes.db", test).open()
    try:
        return RatingServer(test, store, (host, port))
    except OSError as error:
        store.close()
        raise P808Error(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
