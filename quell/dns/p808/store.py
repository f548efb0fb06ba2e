"""The votes of a served test, in SQLite: who rated which session, which clips played to the end, every vote.

One server owns a database file at a time: it holds an exclusive lock on `<db>.lock` while it runs, and checks
at start that no other program holds the database itself. Every request opens its own connection (SQLite in WAL
mode: readers never wait for the writer) and writes in one `BEGIN IMMEDIATE` transaction, so concurrent raters
are serialised by SQLite and a request never sees another's half-done work. `analyze` reads the file read-only,
also while the server runs.

Tables:
    meta         key/value: the fingerprint of the test.json the votes belong to
    assignments  rater, session, started_at, completed_at (NULL while the rater is in it)
    plays        rater, session, item, played_at: the page reported that the item's clips played to the end
    votes        rater, session, item, role, clip, condition, scale, vote, played, played_at, voted_at
Times are UTC, ISO 8601, from the server's clock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from quell.dns.p808.design import ListeningTest, P808Error, VoteError

VOTE_COLUMNS = ("rater", "session", "item", "role", "clip", "condition", "scale", "vote", "played", "played_at",
                "voted_at")
RATER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
BUSY_SECONDS = 5.0  # a request waits this long for another writer before it answers 503
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS assignments (rater TEXT NOT NULL, session TEXT NOT NULL, started_at TEXT NOT NULL, "
    "completed_at TEXT, PRIMARY KEY (rater, session))",
    "CREATE TABLE IF NOT EXISTS plays (rater TEXT NOT NULL, session TEXT NOT NULL, item TEXT NOT NULL, "
    "played_at TEXT NOT NULL, PRIMARY KEY (rater, session, item))",
    "CREATE TABLE IF NOT EXISTS votes (rater TEXT NOT NULL, session TEXT NOT NULL, item TEXT NOT NULL, "
    "role TEXT NOT NULL, clip TEXT NOT NULL, condition TEXT NOT NULL, scale TEXT NOT NULL, vote INTEGER NOT NULL, "
    "played INTEGER NOT NULL, played_at TEXT, voted_at TEXT NOT NULL, PRIMARY KEY (rater, session, item, scale))",
)


class Conflict(Exception):
    """A well-formed submission that the state refuses (HTTP 409): `code` tells the page which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fingerprint(test: ListeningTest) -> str:
    """Identifies the test.json that votes belong to."""
    assert test.folder is not None
    return hashlib.sha256((test.folder / "test.json").read_bytes()).hexdigest()[:16]


class VoteStore:
    """The database of one served test; `open()` takes the file for this process, `close()` gives it back."""

    def __init__(self, path: str | Path, test: ListeningTest) -> None:
        self.path = Path(path)
        self.test = test
        self._lock: int | None = None

    def open(self) -> VoteStore:
        """Lock the file for this server, refuse a database another program holds, create the tables."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise P808Error(f"{self.path} is in use by another `quell p808 serve` (it holds {lock_path}); "
                            f"stop that server first") from None
        self._lock = descriptor
        try:
            with closing(sqlite3.connect(self.path, timeout=1.0, isolation_level=None)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("BEGIN EXCLUSIVE")  # fails at once if another program holds the database
                for statement in _SCHEMA:
                    connection.execute(statement)
                mine = fingerprint(self.test)
                stored = connection.execute("SELECT value FROM meta WHERE key = 'test'").fetchone()
                if stored is None:
                    connection.execute("INSERT INTO meta VALUES ('test', ?)", (mine,))
                connection.execute("COMMIT")
        except sqlite3.Error as error:
            self.close()
            raise P808Error(f"cannot use {self.path}: {error} (is another program using it?)") from None
        if stored is not None and stored[0] != mine:
            self.close()
            raise P808Error(f"{self.path} holds the votes of another test; give this test its own database")
        return self

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            connection.close()

    def _check_assigned(self, connection: sqlite3.Connection, rater: object, session: object) -> None:
        if not isinstance(rater, str) or not RATER_ID.fullmatch(rater):
            raise VoteError("rater: 1 to 64 letters, digits, '.', '_', '-' or '@'")
        assigned = connection.execute("SELECT 1 FROM assignments WHERE rater = ? AND session = ?",
                                      (rater, session if isinstance(session, str) else None)).fetchone()
        if assigned is None:
            raise VoteError(f"session {session!r} is not assigned to rater {rater!r}")

    def start(self, rater: object) -> dict:
        """The session `rater` is in (with the items answered so far), else a new one: the least-rated session
        this rater has not done that still needs raters. {"finished": true, ...} when there is none."""
        if not isinstance(rater, str) or not RATER_ID.fullmatch(rater):
            raise VoteError("rater: 1 to 64 letters, digits, '.', '_', '-' or '@'")
        with self._transaction() as connection:
            row = connection.execute("SELECT session FROM assignments WHERE rater = ? AND completed_at IS NULL",
                                     (rater,)).fetchone()
            if row is None:
                counts = dict(connection.execute("SELECT session, COUNT(*) FROM assignments GROUP BY session"))
                done = {s for (s,) in connection.execute("SELECT session FROM assignments WHERE rater = ?", (rater,))}
                open_sessions = [s for s in self.test.sessions
                                 if s.id not in done and counts.get(s.id, 0) < self.test.raters_per_session]
                if not open_sessions:
                    return {"finished": True, "message": f"There is no session left for you, {rater}. Thank you!"}
                session = min(open_sessions, key=lambda s: counts.get(s.id, 0))
                connection.execute("INSERT INTO assignments VALUES (?, ?, ?, NULL)", (rater, session.id, _now()))
            else:
                session = self.test.session(row[0])
            answered = [item for (item,) in connection.execute(
                "SELECT item FROM votes WHERE rater = ? AND session = ? GROUP BY item ORDER BY MIN(rowid)",
                (rater, session.id))]
        return {"session": self.test.public_session(session), "answered": answered}

    def played(self, rater: object, session: object, item: object) -> None:
        """Record that the clips of an item played to their end (the first time counts)."""
        with self._transaction() as connection:
            self._check_assigned(connection, rater, session)
            found = self.test.session(session)
            if not isinstance(item, str) or found.item(item) is None:
                raise VoteError(f"session {session} has no item {item!r}")
            connection.execute("INSERT OR IGNORE INTO plays VALUES (?, ?, ?, ?)", (rater, session, item, _now()))

    def vote(self, rater: object, session: object, item: object, votes: object) -> bool:
        """Store the votes of one item; True when they complete the rater's session."""
        found, entry, votes = self.test.check_vote(session, item, votes)
        with self._transaction() as connection:
            self._check_assigned(connection, rater, found.id)
            played = connection.execute("SELECT played_at FROM plays WHERE rater = ? AND session = ? AND item = ?",
                                        (rater, found.id, entry.id)).fetchone()
            if played is None:
                raise Conflict("not-played", "play the sample to its end before rating it")
            if connection.execute("SELECT 1 FROM votes WHERE rater = ? AND session = ? AND item = ?",
                                  (rater, found.id, entry.id)).fetchone():
                raise Conflict("already-voted", f"item {entry.id} of session {found.id} is already rated")
            now = _now()
            connection.executemany("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)", [
                (rater, found.id, entry.id, entry.role, entry.rated_clip, entry.condition, scale, vote, played[0], now)
                for scale, vote in votes.items()])
            (answered,) = connection.execute("SELECT COUNT(DISTINCT item) FROM votes WHERE rater = ? AND session = ?",
                                             (rater, found.id)).fetchone()
            complete = answered == len(found.items)
            if complete:
                connection.execute("UPDATE assignments SET completed_at = ? WHERE rater = ? AND session = ?",
                                   (now, rater, found.id))
        return complete


def read_votes(path: str | Path) -> list[dict]:
    """Every vote in a database (opened read-only: safe while a server writes to it)."""
    path = Path(path)
    if not path.is_file():
        raise P808Error(f"no votes database at {path}")
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_SECONDS)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(
                f"SELECT {', '.join(VOTE_COLUMNS)} FROM votes ORDER BY rater, session, voted_at, item, scale")]
    except sqlite3.Error as error:
        raise P808Error(f"cannot read votes from {path}: {error}") from None
