"""Listening page durability (issue 17, item 4): a real server process SIGKILLed mid-load and
started again on the same database loses no acknowledged vote and counts no retry twice; the
export matches the database. benchmarks/listening_load.py --kill-at runs the same with 50
listeners."""

import contextlib
import sqlite3

from musicrl_jax.listening.store import Store
from test_listening import Session, load


def test_sigkill_mid_load_loses_and_duplicates_no_acknowledged_vote(tmp_path):
    listeners, per_listener = 8, 15
    batch = load.make_demo_batch(str(tmp_path / "batch"), per_listener)
    db_path = str(tmp_path / "votes.db")
    tokens = load.invite(db_path, listeners)
    server = load.ServerProcess(batch.directory, db_path, log_path=str(tmp_path / "server.log"))
    try:
        server.start()
        run = load.run_load_with_kill(server, tokens, per_listener, kill_at=0.4)
    finally:
        server.stop()
    total = listeners * per_listener
    assert run["exit_status"] == -9  # a real SIGKILL, not a clean shutdown
    assert total * 0.4 <= run["acknowledged_before"] < total  # mid-load: votes came after it
    figures = load.check_votes(db_path, run["acknowledged"], str(tmp_path / "export"))
    assert figures == {"acknowledged": total, "stored": total, "duplicates": 0, "lost": 0,
                       "unacknowledged": 0, "export_equal": True}
    # Every listener sent its last acknowledged vote again: answered with the stored vote.
    assert run["replayed"] >= listeners


def test_the_same_vote_sent_again_is_a_replay_and_a_different_one_a_conflict(tmp_path):
    session = Session(load.make_demo_batch(str(tmp_path / "batch"), 2),
                      str(tmp_path / "votes.db"), rate_per_second=0.0)
    client = session.client("alice")
    pair = session.next_pair(client)
    first = session.vote(client, pair, "b", rating_a=4)
    assert first.status_code == 201 and not first.json()["replayed"]
    again = session.vote(client, pair, "b", rating_a=4)
    assert again.status_code == 200 and again.json() == {**first.json(), "replayed": True}
    assert session.vote(client, pair, "b", rating_a=5).status_code == 409
    # The page's form, submitted twice (a double click, or resent after a restart).
    form = {"pair_id": pair["pair_id"], "choice": "b", "rating_a": "4",
            "csrf_token": pair["csrf_token"]}
    assert client.post("/vote", data=form, follow_redirects=False).status_code == 303
    assert len(session.store.votes()) == 1
    session.store.close()


def test_the_store_opens_the_database_in_wal_mode_with_full_sync(tmp_path):
    """FULL: a vote is acknowledged after its commit, and WAL + NORMAL may lose the last
    commits on a power cut (a kill test cannot show that, so the setting is checked here)."""
    store = Store(str(tmp_path / "votes.db"))
    try:
        assert store._query("PRAGMA synchronous")[0][0] == 2  # FULL
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(str(tmp_path / "votes.db"))) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
