"""SQLite store of a listening session: listeners, sessions, issued pairs, votes, security events.

One file in WAL mode (readers never block the writer; an `invite` from the CLI can run beside a
serving process). Credentials are stored only as SHA-256 hashes: a leaked database file does
not let anyone log in.

Pair assignment: every listener gets every pair of the batch, in a shuffled order that is a
pure function of (batch id, listener id). The server *issues* a listener the first pair in that
order they have not voted on, picking at random (and recording, in `issued`) which clip is
shown as A. A listener may vote only on a pair issued to them; any other pair id — a pair
further down their order, or a pair id they were never shown — counts as "another listener's
pair" and is refused. UNIQUE(listener_id, pair_id) in `votes` makes a second vote a conflict;
the same vote sent again (a client retrying after a lost response or a server restart) is
answered with the stored vote instead, so a retry is never counted twice.

Durability: every vote is committed (WAL, synchronous=FULL) before the server answers, so an
acknowledged vote survives a killed server process and a power cut.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import secrets
import sqlite3
import threading
import time
from typing import Any, Callable

from musicrl_jax.errors import ConfigError

SECURITY_LOG = logging.getLogger("musicrl_jax.listening.security")
LISTENER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHOICES = ("a", "b", "none")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS listeners (
    listener_id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    session_hash TEXT PRIMARY KEY,
    listener_id TEXT NOT NULL REFERENCES listeners(listener_id),
    csrf_token TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issued (
    listener_id TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    clip_a TEXT NOT NULL,
    clip_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    swapped INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    PRIMARY KEY (listener_id, pair_id)
);
CREATE TABLE IF NOT EXISTS votes (
    vote_id INTEGER PRIMARY KEY AUTOINCREMENT,
    listener_id TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    clip_a TEXT NOT NULL,
    clip_b TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    swapped INTEGER NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'none')),
    rating_a INTEGER CHECK (rating_a BETWEEN 1 AND 5),
    rating_b INTEGER CHECK (rating_b BETWEEN 1 AND 5),
    created_at REAL NOT NULL,
    UNIQUE (listener_id, pair_id)
);
CREATE TABLE IF NOT EXISTS security_events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    kind TEXT NOT NULL,
    listener_id TEXT,
    client TEXT,
    path TEXT,
    detail TEXT
);
"""


class DuplicateVote(Exception):
    """The listener already voted on this pair, differently."""


class QuotaReached(Exception):
    """The listener has cast the most votes the server takes from one listener."""

    def __init__(self, votes_cast: int):
        super().__init__(votes_cast)
        self.votes_cast = votes_cast


class SessionExpired(Exception):
    """The session exists but is older than the server's session lifetime."""

    def __init__(self, age_s: float):
        super().__init__(age_s)
        self.age_s = age_s


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _shorten(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"


def assignment_order(pair_ids: list[str], batch_id: str, listener_id: str) -> list[str]:
    """The listener's shuffled order over the batch (deterministic, different per listener)."""
    order = sorted(pair_ids)
    random.Random(f"{batch_id}\x00{listener_id}").shuffle(order)
    return order


class Store:
    """Thread-safe access to one database file (one connection behind a lock: SQLite runs
    one writer at a time anyway, and this keeps 'database is locked' out of the request path).
    `clock` stamps every row and ages sessions (tests pass a fake one)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self.path, self.clock = path, clock
        try:
            self._conn = sqlite3.connect(path, check_same_thread=False, timeout=10.0,
                                         isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: WAL + NORMAL survives a killed process but can lose the last
            # commits on a power cut, and a vote is acknowledged only after its commit. One
            # fsync per vote is nothing at the rate people vote.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as err:
            raise ConfigError(f"Cannot open the listening database {path}: {err}. Fix: point "
                              "--db at a writable file path.") from err
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            self._conn.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    # --- listeners and sessions -----------------------------------------------------------

    def invite(self, listener_id: str | None = None) -> tuple[str, str]:
        """Creates a listener; returns (listener_id, invite token). The token is shown once."""
        listener_id = listener_id or f"listener-{secrets.token_hex(4)}"
        if not LISTENER_ID_PATTERN.match(listener_id):
            raise ConfigError(f"invite --name {listener_id!r}: use letters, digits, '_', '-', "
                              "'.' (at most 64 characters).")
        token = secrets.token_urlsafe(24)
        try:
            self._execute("INSERT INTO listeners (listener_id, token_hash, created_at) "
                          "VALUES (?, ?, ?)", (listener_id, token_hash(token), self.clock()))
        except sqlite3.IntegrityError as err:
            raise ConfigError(f"invite --name {listener_id!r}: that listener already exists. "
                              "Fix: choose another name (or use `invite --revoke`).") from err
        return listener_id, token

    def revoke(self, listener_id: str) -> None:
        cursor = self._execute("UPDATE listeners SET revoked = 1 WHERE listener_id = ?",
                               (listener_id,))
        if cursor.rowcount == 0:
            raise ConfigError(f"invite --revoke {listener_id!r}: no such listener.")
        self._execute("DELETE FROM sessions WHERE listener_id = ?", (listener_id,))

    def listener_for_token(self, token: str) -> str | None:
        rows = self._query("SELECT listener_id FROM listeners WHERE token_hash = ? AND "
                           "revoked = 0", (token_hash(token),))
        return rows[0]["listener_id"] if rows else None

    def create_session(self, listener_id: str) -> tuple[str, str]:
        """Returns (session id for the cookie, CSRF token for the session's forms)."""
        session_id, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                      (token_hash(session_id), listener_id, csrf_token, self.clock()))
        return session_id, csrf_token

    def session(self, session_id: str, max_age_s: float) -> tuple[str, str] | None:
        """(listener_id, csrf_token) of a session of a listener not revoked, else None; raises
        SessionExpired if the session is older than `max_age_s`."""
        rows = self._query(
            "SELECT s.listener_id, s.csrf_token, s.created_at FROM sessions s JOIN listeners l "
            "ON l.listener_id = s.listener_id WHERE s.session_hash = ? AND l.revoked = 0",
            (token_hash(session_id),))
        if not rows:
            return None
        age_s = self.clock() - rows[0]["created_at"]
        if age_s > max_age_s:
            raise SessionExpired(age_s)
        return rows[0]["listener_id"], rows[0]["csrf_token"]

    # --- batches, issuing and voting ---------------------------------------------------------

    def register_batch(self, batch_id: str, path: str) -> None:
        """Remembers where a batch lives so `export` can find its codes."""
        self._execute("INSERT INTO batches VALUES (?, ?) ON CONFLICT(batch_id) DO UPDATE SET "
                      "path = excluded.path", (batch_id, path))

    def batch_paths(self) -> dict[str, str]:
        return {r["batch_id"]: r["path"] for r in self._query("SELECT * FROM batches")}

    def voted_pairs(self, listener_id: str) -> set[str]:
        return {r["pair_id"] for r in self._query(
            "SELECT pair_id FROM votes WHERE listener_id = ?", (listener_id,))}

    def issue(self, listener_id: str, batch_id: str, pair_id: str,
              clips: tuple[tuple[str, str], tuple[str, str]]) -> sqlite3.Row:
        """Issues a pair (clips: ((clip_id, model_id), ...) in manifest order) with a random side
        for each clip; an already issued pair keeps the sides it was first shown with."""
        swapped = secrets.randbelow(2)
        (clip_a, model_a), (clip_b, model_b) = clips[::-1] if swapped else clips
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO issued VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (listener_id, pair_id, batch_id, clip_a, clip_b, model_a, model_b, swapped,
                 self.clock()))
            return self._conn.execute("SELECT * FROM issued WHERE listener_id = ? AND "
                                      "pair_id = ?", (listener_id, pair_id)).fetchone()

    def issued(self, listener_id: str, pair_id: str) -> sqlite3.Row | None:
        rows = self._query("SELECT * FROM issued WHERE listener_id = ? AND pair_id = ?",
                           (listener_id, pair_id))
        return rows[0] if rows else None

    def clip_issued_to(self, listener_id: str, clip_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM issued WHERE listener_id = ? AND (clip_a = ? OR "
                                "clip_b = ?) LIMIT 1", (listener_id, clip_id, clip_id)))

    def vote_count(self, listener_id: str) -> int:
        return self._query("SELECT COUNT(*) AS n FROM votes WHERE listener_id = ?",
                           (listener_id,))[0]["n"]

    def record_vote(self, issued: sqlite3.Row, choice: str, rating_a: int | None,
                    rating_b: int | None, max_votes: int = 0) -> tuple[int, bool]:
        """Stores a vote on an issued pair; returns (vote_id, replayed). The same vote sent
        again returns the stored one's id with replayed=True. Raises DuplicateVote for a
        different vote on the pair, QuotaReached when the listener already cast `max_votes`
        (> 0) votes. One IMMEDIATE transaction, so the checks and the insert are atomic even
        against another process on the database."""
        listener_id, pair_id = issued["listener_id"], issued["pair_id"]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                stored = self._conn.execute(
                    "SELECT vote_id, choice, rating_a, rating_b FROM votes WHERE listener_id = ? "
                    "AND pair_id = ?", (listener_id, pair_id)).fetchone()
                if stored is not None:
                    if tuple(stored)[1:] != (choice, rating_a, rating_b):
                        raise DuplicateVote(pair_id)
                    self._conn.execute("COMMIT")
                    return int(stored["vote_id"]), True
                votes_cast = self._conn.execute("SELECT COUNT(*) FROM votes WHERE "
                                                "listener_id = ?", (listener_id,)).fetchone()[0]
                if max_votes > 0 and votes_cast >= max_votes:
                    raise QuotaReached(votes_cast)
                cursor = self._conn.execute(
                    "INSERT INTO votes (listener_id, pair_id, batch_id, clip_a, clip_b, model_a, "
                    "model_b, swapped, choice, rating_a, rating_b, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (listener_id, pair_id, issued["batch_id"], issued["clip_a"],
                     issued["clip_b"], issued["model_a"], issued["model_b"], issued["swapped"],
                     choice, rating_a, rating_b, self.clock()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return int(cursor.lastrowid), False

    def votes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM votes ORDER BY vote_id")]

    # --- security events ------------------------------------------------------------------------

    def security_event(self, kind: str, client: str | None, path: str | None,
                       listener_id: str | None = None, detail: str = "") -> None:
        """Logs a refused request (python logging and the security_events table). Clients
        choose these values (a path can be 60 KB): each is cut to a few hundred characters."""
        kind, client, listener_id = (_shorten(v, 64) for v in (kind, client, listener_id))
        path, detail = _shorten(path, 200), _shorten(detail, 300)
        SECURITY_LOG.warning("refused %s: client=%s listener=%s path=%r %s", kind, client,
                             listener_id, path, detail)
        self._execute("INSERT INTO security_events (created_at, kind, listener_id, client, path, "
                      "detail) VALUES (?, ?, ?, ?, ?, ?)",
                      (self.clock(), kind, listener_id, client, path, detail))

    def security_events(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM security_events ORDER BY event_id")]
