"""Listening page: what the shared fixture cannot see (issue 20, item 5). Its rate_per_second=0
also turns off the failed-login and admin limits, so they run here with the limits on; and
session expiry, the Secure cookie flag, the frame / sniffing headers on every kind of reply and
the Origin check of /api/vote and POST /login, which no other test sends. Issue 17, item 4:
session expiry on a fake clock, and the per-listener vote quota."""

import re
import threading

import pytest
from fastapi.testclient import TestClient

from musicrl_jax.listening.server import SESSION_COOKIE
from musicrl_jax.listening.store import QuotaReached, Store
from test_listening import ADMIN, Session, demo_batch, session  # noqa: F401 (fixtures)

# Failed attempts refill at rate_per_second / 5 = 0.01 a second: none while a test runs, so
# the 11th failure in a row is refused however slow the machine is.
SLOW = 0.05


@pytest.fixture
def limited(demo_batch, tmp_path):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=SLOW)
    yield s
    s.store.close()


def _login(client, token):
    return client.get("/login", params={"token": token}, follow_redirects=False)


def test_failed_logins_are_limited_per_client_address(limited):
    guesser = TestClient(limited.app)  # client address "testclient"
    assert [_login(guesser, f"guess-{i}").status_code for i in range(10)] == [401] * 10
    refused = _login(guesser, "guess-10")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    # Every kind of failed authentication draws on the same bucket of the address: the posted
    # login form, a forged session cookie, no cookie at all.
    assert guesser.post("/login", data={"token": "guess"},
                        follow_redirects=False).status_code == 429
    forged = TestClient(limited.app)
    forged.cookies.set(SESSION_COOKIE, "forged")
    assert forged.get("/api/next").status_code == 429
    assert TestClient(limited.app).get("/").status_code == 429
    # Only failures count: a real invite still logs in from that address (a guesser behind
    # the same NAT does not lock listeners out), and another address has its own bucket.
    _, token = limited.store.invite("alice")
    assert _login(guesser, token).status_code == 303
    other = TestClient(limited.app, client=("203.0.113.9", 4321))
    assert _login(other, "guess").status_code == 401
    events = limited.events()
    assert events.count("bad_invite_token") == 11 and events.count("rate_limited_login") == 4


def test_wrong_admin_tokens_are_limited_and_the_admin_still_gets_in(limited):
    client = TestClient(limited.app)
    wrong = {"Authorization": "Bearer wrong"}
    assert [client.get("/admin", headers=wrong).status_code for _ in range(10)] == [401] * 10
    refused = client.get("/admin", headers=wrong)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert client.get("/admin").status_code == 429  # no credentials: a failure as well
    response = client.get("/admin", params={"format": "json"},
                          headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200 and response.json()["votes"] == 0
    # Admin and login failures share the address's bucket: guessing one does not reset the other.
    assert _login(client, "guess").status_code == 429
    events = limited.events()
    assert events.count("bad_admin_token") == 10 and events.count("rate_limited_admin") == 2


class FakeClock:
    """The store's clock, moved by hand."""

    def __init__(self, now: float = 1.7e9):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_session_expires_after_session_max_age_s_and_the_page_starts_a_new_one(
        demo_batch, tmp_path):
    clock = FakeClock()
    # Limits on: an expired session must not count as a failed login.
    s = Session(demo_batch, str(tmp_path / "votes.db"), clock, rate_per_second=SLOW,
                session_max_age_s=60.0)
    client = TestClient(s.app)
    _, token = s.store.invite("alice")
    response = _login(client, token)
    assert re.search(r"max-age=60(;|$)", response.headers["set-cookie"].lower())
    pair = s.next_pair(client)
    clock.now += 60.0  # exactly the lifetime: still live
    assert client.get("/api/next").status_code == 200
    clock.now += 1.0
    for _ in range(12):  # more than the 10 failed logins an address may have
        response = client.get("/api/next")
        assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert "session expired" in error and "session_max_age_s" in error
    assert "--session-max-age-hours" in error and "invite link" in error
    assert s.vote(client, pair).status_code == 401 and s.store.votes() == []
    page = client.get("/")
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert "session expired" in page.text and 'action="/login"' in page.text
    assert s.events() == []  # expiry is not probing
    # The page's form (the token posted) starts a new session, which votes.
    response = client.post("/login", data={"token": token}, follow_redirects=False)
    assert response.status_code == 303
    assert s.vote(client, s.next_pair(client)).status_code == 201
    s.store.close()


def test_serve_takes_the_session_lifetime_and_the_vote_quota(demo_batch, tmp_path, capsys,
                                                             monkeypatch):
    from musicrl_jax.listening import __main__ as cli
    from musicrl_jax.listening import server
    import uvicorn
    settings = []
    monkeypatch.setattr(server, "create_app", lambda batch, store, s: settings.append(s))
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    serve = ["serve", "--batch", demo_batch.directory, "--db", str(tmp_path / "v.db")]
    cli.main(serve)
    cli.main(serve + ["--session-max-age-hours", "2", "--max-votes-per-listener", "30"])
    assert [(s.session_max_age_s, s.max_votes_per_listener) for s in settings] == [
        (24 * 3600.0, 0), (7200.0, 30)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(serve + ["--session-max-age-hours", "0"])
    assert exit_info.value.code == 2 and "--session-max-age-hours" in capsys.readouterr().err


def test_votes_beyond_max_votes_per_listener_are_403_and_retries_still_answered(
        demo_batch, tmp_path):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.0,
                max_votes_per_listener=2)
    alice, bob = s.client("alice"), s.client("bob")
    cast = []
    for _ in range(2):
        pair = s.next_pair(alice)
        assert not pair["quota_reached"] and s.vote(alice, pair, "b").status_code == 201
        cast.append(pair)
    after = s.next_pair(alice)
    assert after["done"] and after["quota_reached"] and after["judged"] == 2
    assert "as many as this session takes" in alice.get("/").text
    # A pair issued before the quota was reached (say the server ran with a higher one).
    unvoted = next(p for p in demo_batch.pairs if p.pair_id not in {c["pair_id"] for c in cast})
    s.store.issue("alice", demo_batch.batch_id, unvoted.pair_id,
                  tuple((c.clip_id, c.model_id) for c in unvoted.clips))
    response = s.vote(alice, {**cast[0], "pair_id": unvoted.pair_id})
    assert response.status_code == 403
    error = response.json()["error"]
    assert "quota" in error and "max_votes_per_listener = 2" in error
    assert "--max-votes-per-listener" in error
    # A retry of a vote already taken is still answered (as a replay), quota or not.
    again = s.vote(alice, cast[1], "b")
    assert again.status_code == 200 and again.json()["replayed"]
    assert len(s.store.votes()) == 2
    # The quota is per listener.
    assert s.vote(bob, s.next_pair(bob)).status_code == 201
    s.store.close()


def test_the_quota_holds_for_concurrent_votes_from_two_server_processes(demo_batch, tmp_path):
    """Two Stores (two connections, as two server processes would have) racing one listener's
    votes: the count and the insert are one transaction, so the quota is never passed."""
    db_path = str(tmp_path / "votes.db")
    stores = [Store(db_path), Store(db_path)]
    stores[0].invite("alice")
    issued = [stores[0].issue("alice", demo_batch.batch_id, p.pair_id,
                              tuple((c.clip_id, c.model_id) for c in p.clips))
              for p in demo_batch.pairs]
    outcomes = []
    barrier = threading.Barrier(len(issued))

    def vote(i):
        barrier.wait()
        try:
            outcomes.append(stores[i % 2].record_vote(issued[i], "a", None, None, max_votes=3))
        except QuotaReached as reached:
            outcomes.append(reached.votes_cast)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(len(issued))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stores[0].votes()) == 3
    assert sorted(o for o in outcomes if isinstance(o, int)) == [3] * (len(issued) - 3)
    for store in stores:
        store.close()


@pytest.mark.parametrize("secure_cookies, base_url, secure", [
    (False, "http://testserver", False),  # a Secure cookie would never come back over http
    (True, "http://testserver", True),  # behind a TLS proxy the app itself sees http
    (False, "https://testserver", True),
])
def test_the_session_cookie_is_secure_when_configured_or_over_https(
        demo_batch, tmp_path, secure_cookies, base_url, secure):
    s = Session(demo_batch, str(tmp_path / "votes.db"), rate_per_second=0.0,
                secure_cookies=secure_cookies)
    _, token = s.store.invite("alice")
    cookie = _login(TestClient(s.app, base_url=base_url), token).headers["set-cookie"]
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert ("secure" in attributes) == secure, cookie
    assert {"httponly", "samesite", "max-age", "path"} <= attributes, cookie
    s.store.close()


def test_every_kind_of_reply_forbids_framing_and_sniffing(session):
    client = session.client("alice")
    pair = session.next_pair(client)
    anonymous = TestClient(session.app)
    replies = {
        "page": client.get("/"), "api": client.get("/api/next"),
        "audio": client.get(pair["audio_a"]), "vote": session.vote(client, pair),
        "login form": anonymous.get("/login"), "healthz": anonymous.get("/healthz"),
        "401": anonymous.get("/api/next"), "404": client.get("/no-such-route"),
        "400 traversal": client.get("/audio/..%2Fx"),
        "413": client.post("/api/vote", content=b"x" * 20_000,
                           headers={"X-CSRF-Token": pair["csrf_token"]}),
    }
    for name, reply in replies.items():
        assert reply.headers.get("x-frame-options") == "DENY", (name, reply.status_code)
        assert reply.headers.get("x-content-type-options") == "nosniff", name
        assert "frame-ancestors 'none'" in reply.headers.get("content-security-policy", ""), name
    assert replies["vote"].status_code == 201 and replies["413"].status_code == 413


def test_api_vote_and_the_login_form_refuse_a_foreign_origin(session):
    """test_listening checks the Origin of the HTML form's POST /vote; the JSON API and the
    login form check it too (a right CSRF token is not enough)."""
    client = session.client("alice")
    pair = session.next_pair(client)
    body = {"pair_id": pair["pair_id"], "choice": "a"}
    csrf = {"X-CSRF-Token": pair["csrf_token"]}
    # Another site, another port, a look-alike host, and the opaque origin of a sandboxed frame.
    for origin in ("http://evil.example", "http://testserver:8080",
                   "http://testserver.evil.example", "null"):
        response = client.post("/api/vote", json=body, headers={**csrf, "Origin": origin})
        assert response.status_code == 403 and "cross-site" in response.json()["error"], origin
    assert session.store.votes() == [] and session.events().count("foreign_origin") == 4
    # Login CSRF: a foreign page must not log the visitor in as someone else.
    _, token = session.store.invite("mallory")
    response = TestClient(session.app).post("/login", data={"token": token},
                                            headers={"Origin": "http://evil.example"},
                                            follow_redirects=False)
    assert response.status_code == 403 and "set-cookie" not in response.headers
    # The page's own origin is accepted.
    response = client.post("/api/vote", json=body,
                           headers={**csrf, "Origin": "http://testserver"})
    assert response.status_code == 201
