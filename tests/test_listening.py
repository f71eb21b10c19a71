"""Listening sessions: API refusals, export round trip, CLI, a small load test and a headless
Chromium run through the page."""

import base64
import importlib.util
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from musicrl_jax.data import feedback
from musicrl_jax.listening import __main__ as cli
from musicrl_jax.listening import batch as batch_lib
from musicrl_jax.listening.export import export_votes
from musicrl_jax.listening.server import ServerSettings, create_app
from musicrl_jax.listening.store import Store, assignment_order
from musicrl_jax.listening.summary import summarize

REPO = os.path.join(os.path.dirname(__file__), "..")
_spec = importlib.util.spec_from_file_location(
    "listening_load", os.path.join(REPO, "benchmarks", "listening_load.py"))
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)

ADMIN = "admin-secret-token"


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory):
    return load.make_demo_batch(str(tmp_path_factory.mktemp("batches") / "demo"), 6)


class Session:
    """A TestClient on a fresh database, with helpers for logging in and voting."""

    def __init__(self, batch, db_path, clock=time.time, **settings):
        self.batch, self.db_path = batch, db_path
        self.store = Store(db_path, clock)
        self.app = create_app(batch, self.store, ServerSettings(admin_token=ADMIN, **settings))

    def client(self, listener_id=None):
        client = TestClient(self.app)
        if listener_id is not None:
            _, token = self.store.invite(listener_id)
            response = client.get("/login", params={"token": token}, follow_redirects=False)
            assert response.status_code == 303
        return client

    @staticmethod
    def next_pair(client):
        response = client.get("/api/next")
        assert response.status_code == 200, response.text
        return response.json()

    @staticmethod
    def vote(client, pair, choice="a", csrf=None, **ratings):
        return client.post("/api/vote", json={"pair_id": pair["pair_id"], "choice": choice,
                                              **ratings},
                           headers={"X-CSRF-Token": csrf or pair["csrf_token"]})

    def events(self):
        return [e["kind"] for e in self.store.security_events()]


@pytest.fixture
def session(demo_batch, tmp_path):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.0)
    yield s
    s.store.close()


def test_requests_without_a_session_or_with_a_bad_token_are_refused(session):
    client = session.client()
    for path in ("/api/next", f"/audio/{session.batch.pairs[0].clips[0].clip_id}"):
        response = client.get(path)
        assert response.status_code == 401 and "error" in response.json()
    page = client.get("/")  # a person: the reason and the login form
    assert page.status_code == 401 and "no session" in page.text and 'action="/login"' in page.text
    assert client.post("/api/vote", json={"pair_id": "x", "choice": "a"}).status_code == 401
    response = client.get("/login", params={"token": "not-an-invite"}, follow_redirects=False)
    assert response.status_code == 401
    assert "listening_session" not in client.cookies
    assert "bad_invite_token" in session.events()
    # A forged session cookie is no session either.
    client.cookies.set("listening_session", "forged")
    assert client.get("/api/next").status_code == 401
    assert "bad_session" in session.events()


def test_login_sets_a_strict_httponly_cookie_and_a_revoked_listener_is_locked_out(session):
    client = TestClient(session.app)
    _, token = session.store.invite("carol")
    response = client.get("/login", params={"token": token}, follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert response.headers["location"] == "/"
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/next").status_code == 200
    session.store.revoke("carol")
    assert client.get("/api/next").status_code == 401


def test_wrong_or_missing_csrf_token_and_foreign_origin_are_refused(session):
    client = session.client("alice")
    pair = session.next_pair(client)
    assert session.vote(client, pair, csrf="wrong").status_code == 403
    response = client.post("/api/vote", json={"pair_id": pair["pair_id"], "choice": "a"})
    assert response.status_code == 403
    form = {"pair_id": pair["pair_id"], "choice": "b", "csrf_token": "wrong"}
    assert client.post("/vote", data=form, follow_redirects=False).status_code == 403
    form["csrf_token"] = "n\u00e9ant"  # non-ASCII must be a 403, not a 500
    assert client.post("/vote", data=form, follow_redirects=False).status_code == 403
    form["csrf_token"] = pair["csrf_token"]
    response = client.post("/vote", data=form, headers={"Origin": "http://evil.example"},
                           follow_redirects=False)
    assert response.status_code == 403
    assert session.store.votes() == []
    assert session.events().count("bad_csrf") == 4 and "foreign_origin" in session.events()
    # The right token through the HTML form is accepted and moves to the next pair.
    response = client.post("/vote", data=form, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert [v["choice"] for v in session.store.votes()] == ["b"]


def test_the_page_shows_the_caption_both_clips_and_the_csrf_field(session):
    client = session.client("alice")
    response = client.get("/")
    pair_id = assignment_order([p.pair_id for p in session.batch.pairs],
                               session.batch.batch_id, "alice")[0]
    issued = session.store.issued("alice", pair_id)
    text = response.text
    assert response.status_code == 200
    assert session.batch.pair(pair_id).caption in text
    assert f"/audio/{issued['clip_a']}" in text and f"/audio/{issued['clip_b']}" in text
    assert 'name=csrf_token' in text and "default-src 'none'" in response.headers[
        "content-security-policy"]
    # Which model is A was randomised and recorded with the pair.
    clip_models = {c.clip_id: c.model_id for c in session.batch.pair(pair_id).clips}
    assert clip_models[issued["clip_a"]] == issued["model_a"]
    assert issued["swapped"] == int(issued["clip_a"] != session.batch.pair(pair_id).clips[0]
                                    .clip_id)


def test_unknown_pair_is_404_and_a_pair_not_issued_to_the_listener_is_403(session):
    client = session.client("alice")
    pair = session.next_pair(client)
    assert session.vote(client, {**pair, "pair_id": "no-such-pair"}).status_code == 404
    later = [p for p in assignment_order([p.pair_id for p in session.batch.pairs],
                                         session.batch.batch_id, "alice")
             if p != pair["pair_id"]][0]
    response = session.vote(client, {**pair, "pair_id": later})
    assert response.status_code == 403 and "not issued" in response.json()["error"]
    assert {"unknown_pair", "pair_not_issued"} <= set(session.events())
    assert session.store.votes() == []


def test_repeated_vote_is_409_and_stored_once(session):
    client = session.client("alice")
    pair = session.next_pair(client)
    assert session.vote(client, pair, "b", rating_a=4).status_code == 201
    response = session.vote(client, pair, "a")
    assert response.status_code == 409 and "already voted" in response.json()["error"]
    votes = session.store.votes()
    assert len(votes) == 1 and votes[0]["choice"] == "b" and votes[0]["rating_a"] == 4
    with pytest.raises(sqlite3.IntegrityError):  # the constraint itself, not just the handler
        conn = sqlite3.connect(session.db_path)
        conn.execute("INSERT INTO votes (listener_id, pair_id, batch_id, clip_a, clip_b, "
                     "model_a, model_b, swapped, choice, created_at) SELECT listener_id, "
                     "pair_id, batch_id, clip_a, clip_b, model_a, model_b, swapped, 'a', 0 "
                     "FROM votes")
    conn.close()


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 422),
    (json.dumps({"choice": "a"}).encode(), 422),
    (json.dumps({"pair_id": "x", "choice": "maybe"}).encode(), 422),
    (json.dumps({"pair_id": "x", "choice": "a", "rating_a": 7}).encode(), 422),
    (json.dumps({"pair_id": "x", "choice": "a", "rating_b": True}).encode(), 422),
    (json.dumps({"pair_id": "../../x", "choice": "a"}).encode(), 422),
    (b'{"pair_id": "' + b"x" * 20000 + b'", "choice": "a"}', 413),
])
def test_malformed_vote_bodies_are_4xx_with_a_json_message(session, body, status):
    client = session.client("alice")
    pair = session.next_pair(client)
    response = client.post("/api/vote", content=body, headers={
        "X-CSRF-Token": pair["csrf_token"], "Content-Type": "application/json"})
    assert response.status_code == status and isinstance(response.json()["error"], str)
    assert session.store.votes() == []


@pytest.mark.parametrize("path", [
    "/audio/..%2F..%2Fetc%2Fpasswd",
    "/audio/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/audio/..%5C..%5Cetc%5Cpasswd",
    "/audio/%252e%252e%252fetc%252fpasswd",
    "/audio/..%2Fmanifest.json",
    "/%2e%2e/%2e%2e/etc/passwd",
])
def test_path_traversal_is_refused_and_logged(session, path, caplog):
    client = session.client("alice")
    session.next_pair(client)
    with caplog.at_level(logging.WARNING, logger="musicrl_jax.listening.security"):
        response = client.get(path)
    assert 400 <= response.status_code < 500
    assert "root:" not in response.text and "pairs" not in response.text
    assert set(session.events()) & {"path_traversal", "malformed_clip_id"}
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_audio_only_for_clips_issued_to_the_listener(session):
    client = session.client("alice")
    pair = session.next_pair(client)
    response = client.get(pair["audio_a"])
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    assert response.headers["content-type"] == "audio/wav"
    issued = {pair["audio_a"].split("/")[-1], pair["audio_b"].split("/")[-1]}
    other = next(c.clip_id for p in session.batch.pairs for c in p.clips
                 if c.clip_id not in issued)
    assert client.get(f"/audio/{other}").status_code == 403
    assert client.get("/audio/0123456789abcdef").status_code == 404
    assert {"clip_not_issued", "unknown_clip"} <= set(session.events())


def test_rate_limit_is_429_per_listener(demo_batch, tmp_path):
    session = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.01,
                      rate_burst=3)
    alice, bob = session.client("alice"), session.client("bob")
    statuses = [alice.get("/api/next").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert int(alice.get("/api/next").headers["retry-after"]) >= 1
    assert bob.get("/api/next").status_code == 200  # another listener has their own bucket
    assert "rate_limited" in session.events()
    session.store.close()


def test_admin_view_needs_the_admin_token(session):
    client = session.client("alice")
    session.vote(client, session.next_pair(client), "a")
    assert client.get("/admin").status_code == 401  # a listener session is not enough
    assert client.get("/admin", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert "bad_admin_token" in session.events()
    response = client.get("/admin", params={"format": "json"},
                          headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and response.json()["votes"] == 1
    basic = base64.b64encode(f"admin:{ADMIN}".encode()).decode()
    response = client.get("/admin", headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200 and "alice: 1" in response.text


def test_export_round_trips_through_the_feedback_readers(session, tmp_path):
    votes_cast = {}
    for listener, choices in (("alice", ["a", "b", "none", "a"]), ("bob", ["b", "b"])):
        client = session.client(listener)
        for i, choice in enumerate(choices):
            pair = session.next_pair(client)
            ratings = {"rating_a": 1 + i, "rating_b": 5} if listener == "alice" else {}
            assert session.vote(client, pair, choice, **ratings).status_code == 201
            votes_cast[(listener, pair["pair_id"])] = choice
    out = str(tmp_path / "feedback")
    result = export_votes(session.db_path, out)
    assert result["preference_records"] == 6 and result["rating_records"] == 8
    records = feedback.read_records(os.path.join(out, "preferences"), "preferences")
    codes = session.batch.load_codes()
    expected_choice = {"a": 0.0, "b": 1.0, "none": 0.5}
    assert len(records) == 6
    stored = {(v["listener_id"], v["pair_id"]): v for v in session.store.votes()}
    for record in records:
        key = (record["rater_id"], record["pair_id"])
        assert record["choice"] == expected_choice[votes_cast[key]]
        np.testing.assert_array_equal(record["tokens_a"], codes[stored[key]["clip_a"]])
        np.testing.assert_array_equal(record["tokens_b"], codes[stored[key]["clip_b"]])
        assert list(record["caption_tokens"]) == list(
            session.batch.pair(record["pair_id"]).caption_tokens)
    ratings = feedback.read_records(os.path.join(out, "ratings"), "ratings")
    assert sorted(r["rating"] for r in ratings) == [1, 2, 3, 4, 5, 5, 5, 5]
    # The preference reward model's source reads the export unchanged (all captions in train).
    source = feedback.preferences_source(os.path.join(out, "preferences"), "train",
                                         caption_length=8, num_frames=12,
                                         validation_fraction=0.0)
    assert source.arrays["tokens_a"].shape == (6, 12, 2)
    assert sorted(source.arrays["choice"].tolist()) == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    # Exporting again rewrites the same files: no duplicated records.
    export_votes(session.db_path, out)
    assert len(feedback.read_records(os.path.join(out, "preferences"), "preferences")) == 6


def test_summary_agreement_and_win_rates(session):
    for listener in ("alice", "bob", "carol"):
        client = session.client(listener)
        for _ in range(len(session.batch.pairs)):
            pair = session.next_pair(client)
            issued = session.store.issued(listener, pair["pair_id"])
            # alice and bob always pick the 'tuned' model; carol always picks 'base'.
            wanted = "base" if listener == "carol" else "tuned"
            choice = "a" if issued["model_a"] == wanted else "b"
            assert session.vote(client, pair, choice).status_code == 201
    summary = summarize(session.store.votes())
    assert summary["votes_per_listener"] == {"alice": 6, "bob": 6, "carol": 6}
    # Per pair: 3 listener pairs, one agreeing (alice-bob).
    assert summary["agreement"]["rate"] == pytest.approx(1 / 3)
    assert summary["agreement"]["shared_pairs"] == 6
    assert summary["win_rates"]["tuned"]["rate"] == pytest.approx(12 / 18)
    assert summary["win_rates"]["base"]["wins"] == 6


def test_each_listener_gets_every_pair_in_their_own_order(demo_batch):
    ids = [p.pair_id for p in demo_batch.pairs]
    orders = {lid: assignment_order(ids, demo_batch.batch_id, lid) for lid in ("a1", "a2", "a3")}
    assert all(sorted(o) == sorted(ids) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1
    assert assignment_order(ids, demo_batch.batch_id, "a1") == orders["a1"]


# --- CLI ----------------------------------------------------------------------------------------

def _write_wavs(directory, count, hz):
    os.makedirs(directory)
    t = np.arange(1600) / 16000
    for i in range(count):
        load.write_wav(os.path.join(directory, f"clip_{i:02d}.wav"),
                       0.3 * np.sin(2 * np.pi * (hz + i) * t), 16000)


def test_make_batch_from_wav_directories_and_codes(tmp_path):
    _write_wavs(tmp_path / "base", 3, 220)
    _write_wavs(tmp_path / "tuned", 3, 440)
    rng = np.random.default_rng(0)
    for name in ("base", "tuned"):
        np.savez(tmp_path / f"{name}.npz", codes=rng.integers(0, 32, (3, 10, 2)),
                 mask=np.repeat([[1] * 8 + [0] * 2], 3, 0))
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"caption": f"song {i}", "caption_tokens": [5 + i, 7, 1]}) + "\n")
    cli.main(["make-batch", "--out", str(tmp_path / "batch"), "--captions",
              str(tmp_path / "captions.jsonl"), "--model-a", "base", "--model-b", "tuned",
              "--wavs-a", str(tmp_path / "base"), "--codes-a", str(tmp_path / "base.npz"),
              "--wavs-b", str(tmp_path / "tuned"), "--codes-b", str(tmp_path / "tuned.npz")])
    batch = batch_lib.load_batch(str(tmp_path / "batch"))
    assert [p.caption for p in batch.pairs] == ["song 0", "song 1", "song 2"]
    assert batch.pairs[1].caption_tokens == (6, 7, 1)
    assert [c.model_id for c in batch.pairs[0].clips] == ["base", "tuned"]
    codes = batch.load_codes()
    assert codes[batch.pairs[0].clips[0].clip_id].shape == (8, 2)  # the mask trimmed it
    with open(batch.clip_path(batch.pairs[2].clips[1].clip_id), "rb") as f, open(
            tmp_path / "tuned" / "clip_02.wav", "rb") as g:
        assert f.read() == g.read()
    # Clip ids must not give the model away in the page's audio URLs.
    assert not any(m in c.clip_id for p in batch.pairs for c in p.clips
                   for m in ("base", "tuned"))


def test_make_batch_decodes_codes_encodes_wavs_and_tokenizes_captions(tmp_path, tiny_tokenizer):
    """Model A given as codes only (decoded with audio.listen.codes_to_wavs), model B as WAVs
    only (encoded with the tokenizer), captions as text (tokenized with the caption vocab)."""
    from musicrl_jax.data.vocab import load_caption_vocabulary, train_caption_vocabulary
    tiny_tokenizer.save(str(tmp_path / "tokenizer"))
    captions = ["slow piano ballad", "fast drum groove"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    train_caption_vocabulary(captions * 20, str(tmp_path / "vocab"), vocab_size=40,
                             tempo_pieces=False)  # the tiny LM embeds 64 caption ids
    np.savez(tmp_path / "base.npz", codes=np.random.default_rng(0).integers(0, 32, (2, 6, 2)))
    _write_wavs(tmp_path / "tuned", 2, 440)
    cli.main(["make-batch", "--out", str(tmp_path / "batch"), "--captions",
              str(tmp_path / "captions.txt"), "--model-a", "base", "--model-b", "tuned",
              "--codes-a", str(tmp_path / "base.npz"), "--wavs-b", str(tmp_path / "tuned"),
              "--tokenizer", str(tmp_path / "tokenizer"), "--caption-vocab",
              str(tmp_path / "vocab")])
    batch = batch_lib.load_batch(str(tmp_path / "batch"))
    codes = batch.load_codes()
    vocabulary = load_caption_vocabulary(str(tmp_path / "vocab"))
    for i, pair in enumerate(batch.pairs):
        assert list(pair.caption_tokens) == list(vocabulary.encode(captions[i])) + [1]
        base, tuned = pair.clips
        np.testing.assert_array_equal(codes[base.clip_id],
                                      np.load(tmp_path / "base.npz")["codes"][i])
        assert codes[tuned.clip_id].shape == (tiny_tokenizer.num_frames(1600), 2)
        # The decoded WAV has the length the tokenizer's frame contract gives 6 frames.
        assert len(sf.read(batch.clip_path(base.clip_id))[0]) == tiny_tokenizer.num_samples(6)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "musicrl_jax.listening", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_user_errors_exit_2_with_a_message_naming_the_fix(tmp_path):
    _write_wavs(tmp_path / "base", 2, 220)
    _write_wavs(tmp_path / "tuned", 3, 440)
    (tmp_path / "captions.txt").write_text("one\ntwo\n")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "base.npz", codes=rng.integers(0, 32, (2, 6, 2)))
    np.savez(tmp_path / "tuned.npz", codes=rng.integers(0, 32, (2, 6, 2)))
    result = _cli("make-batch", "--out", str(tmp_path / "b"), "--captions",
                  str(tmp_path / "captions.txt"), "--model-a", "base", "--model-b", "tuned",
                  "--wavs-a", str(tmp_path / "base"), "--codes-a", str(tmp_path / "base.npz"),
                  "--wavs-b", str(tmp_path / "tuned"), "--codes-b", str(tmp_path / "tuned.npz"))
    assert result.returncode == 2
    assert "--caption-vocab" in result.stderr and "Traceback" not in result.stderr
    result = _cli("export", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "missing.db" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("serve", "--batch", str(tmp_path), "--db", str(tmp_path / "v.db"))
    assert result.returncode == 2 and "manifest.json" in result.stderr


def test_cli_invite_summary_and_export(session, tmp_path, capsys):
    cli.main(["invite", "--db", session.db_path, "--name", "dave", "--base-url",
              "http://127.0.0.1:8000"])
    listener_id, link = capsys.readouterr().out.strip().split("\t")
    assert listener_id == "dave" and link.startswith("http://127.0.0.1:8000/login?token=")
    client = TestClient(session.app)
    assert client.get(link.replace("http://127.0.0.1:8000", ""),
                      follow_redirects=False).status_code == 303
    session.vote(client, session.next_pair(client), "none")
    summary = cli.main(["summary", "--db", session.db_path])
    assert summary["votes_per_listener"] == {"dave": 1}
    result = cli.main(["export", "--db", session.db_path, "--out", str(tmp_path / "fb")])
    assert result["preference_records"] == 1
    assert "dave: 1" in capsys.readouterr().out


# --- against a real uvicorn server ------------------------------------------------------------

def test_small_load_test_loses_and_duplicates_no_vote(tmp_path):
    batch = load.make_demo_batch(str(tmp_path / "load-batch"), 20)
    db_path = str(tmp_path / "load.db")
    tokens = load.invite(db_path, 10)
    with load.running_server(batch.directory, db_path,
                             log_path=str(tmp_path / "server.log")) as url:
        result = load.run_load(url, tokens, 20)
        # A literal '..' path (no client-side normalisation) on the real server.
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"GET /audio/../../etc/passwd HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\n\r\n")
            reply = sock.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 400") and "root:" not in reply
    assert result["votes"] == 200
    assert load.count_votes(db_path) == (200, 200)
    store = Store(db_path)
    assert "path_traversal" in [e["kind"] for e in store.security_events()]
    assert {v["listener_id"] for v in store.votes()} == set(tokens)
    store.close()


def _chrome_binaries():
    return (shutil.which("chromium") or shutil.which("chromium-browser"),
            shutil.which("chromedriver"))


def test_browser_clicks_through_five_pairs_and_the_votes_are_exported(tmp_path):
    chromium, chromedriver = _chrome_binaries()
    if not (chromium and chromedriver):
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium "
                    "chromium-driver, or `make system-deps`)")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    batch = load.make_demo_batch(str(tmp_path / "browser-batch"), 5)
    db_path = str(tmp_path / "browser.db")
    token = load.invite(db_path, 1, prefix="browser")["browser-000"]
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--mute-audio", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    clicked = {}
    with load.running_server(batch.directory, db_path, rate_per_second=5.0,
                             log_path=str(tmp_path / "server.log")) as url:
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(f"{url}/login?token={token}")
            for i, choice in enumerate(["a", "b", "none", "a", "b"]):
                pair_id = driver.find_element(By.ID, "pair_id").get_attribute("value")
                assert driver.find_element(By.ID, "caption").text == batch.pair(pair_id).caption
                driver.find_element(By.ID, f"rating_a_{i + 1}").click()
                driver.find_element(By.ID, f"choose-{choice}").click()
                clicked[pair_id] = choice
                # One script reads the next page atomically; while Chrome swaps documents any
                # driver call can fail transiently (stale node ids), so the wait retries them.
                WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
                    lambda d: d.execute_script(
                        "const e = document.getElementById('pair_id');"
                        "return document.readyState === 'complete' && "
                        "(document.body.innerText.includes('Thank you') || "
                        "(e !== null && e.value !== arguments[0]));", pair_id))
            assert "You judged all 5 pairs" in driver.page_source
        finally:
            driver.quit()
    result = export_votes(db_path, str(tmp_path / "feedback"))
    assert result["preference_records"] == 5
    records = feedback.read_records(str(tmp_path / "feedback" / "preferences"), "preferences")
    expected = {"a": 0.0, "b": 1.0, "none": 0.5}
    assert {r["pair_id"]: r["choice"] for r in records} == {
        p: expected[c] for p, c in clicked.items()}
    ratings = feedback.read_records(str(tmp_path / "feedback" / "ratings"), "ratings")
    assert sorted(r["rating"] for r in ratings) == [1, 2, 3, 4, 5]
